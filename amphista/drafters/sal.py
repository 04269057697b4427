"""Staged Adaptation Layers: causal decoder layers along time over fuse(h_t, embed(x_{t+1})).

They are causal, so in decoding they keep their own KV cache, one entry per committed position, written
by position index into a buffer sized by `reset(max_length)`. Rejected tree nodes never reach it: the
decoder only ever passes committed positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .config import AmphistaConfig
from .layers import DecoderLayer, normal_, rope_inv_freq, rope_tables, zero_


class StagedAdaptation(nn.Module):
    def __init__(self, cfg: AmphistaConfig):
        super().__init__()
        d, w = cfg.hidden_size, cfg.sal_width
        self.variant, self.stages, self.width = cfg.sal_variant, cfg.sal_stages, w
        self.fuse = nn.ModuleList([nn.Linear(2 * d, w, bias=False)])
        if cfg.sal_variant != "token_once":
            self.fuse.extend(nn.Linear(w + d, w, bias=False) for _ in range(cfg.sal_stages - 1))
        for s, fuse in enumerate(self.fuse):
            zero_(fuse)
            if s > 0 or w == d:
                # Pass-through of the first input (h_t, or the previous stage): fusion starts as a no-op.
                with torch.no_grad():
                    fuse.weight[:, :w].copy_(torch.eye(w))
            else:
                normal_(fuse)
        same = w == d
        self.layers = nn.ModuleList(
            DecoderLayer(w, cfg.head_dim, cfg.ffn_size(w), cfg.rms_norm_eps, zero_branches=same)
            for _ in range(cfg.sal_stages)
        )
        # Narrow SAL: a_t = h_t + up(x); up starts at zero (the inner layers cannot also start at zero,
        # or neither would receive a gradient).
        self.up = None if same else zero_(nn.Linear(w, d, bias=False))
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
        self.max_length = 0
        self.length = 0  # committed positions held in the cache
        self._positions = self._cos = self._sin = None
        self.decode_weights: list | None = None  # per layer, gathered by reset() (see DecoderLayer.weights)

    @property
    def num_outputs(self) -> int:
        return self.stages if self.variant == "split" else 1

    def forward(self, h: torch.Tensor, e: torch.Tensor, position_ids: torch.Tensor | None = None):
        """Training: h, e (B, T, d) -> (B, T, d), or (B, T, S, d) for the split variant. Plain causal mask,
        so right padding is harmless."""
        pos = torch.arange(h.shape[1], device=h.device) if position_ids is None else position_ids
        cos, sin = rope_tables(pos, self.inv_freq, h.dtype)  # (3, B or 1, 1, T, hd)
        return self._run(h, e, cos, sin, None, True, None)

    def reset(self, max_length: int, device, dtype) -> None:
        for layer in self.layers:
            layer.attn.allocate_cache(max_length, device, dtype)
        self.decode_weights = [layer.weights(decode=True) for layer in self.layers]
        stale = self._cos is None or self._cos.device != torch.device(device) or self._cos.dtype != dtype
        if stale or max_length > self.max_length:
            # RoPE tables and key positions for the whole sequence, computed once per reset, not per call.
            self._positions = torch.arange(max_length, device=device)
            self._cos, self._sin = rope_tables(self._positions, self.inv_freq, dtype)  # (3, 1, 1, L, hd)
            self.max_length = max_length
        self.length = 0

    def step(self, h: torch.Tensor, e: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Decoding: append positions start_pos.. (h, e (1, n, d)) to the cache; returns the last position's
        output, (1, 1, d) or (1, 1, S, d) for the split variant."""
        n = h.shape[1]
        end = start_pos + n
        if end > self.max_length:
            raise InputError(
                f"the drafter's SAL cache holds {self.max_length} positions but position {end - 1} was asked "
                "for: call drafter.reset(max_length) with the full sequence length first"
            )
        if start_pos > self.length:
            raise InputError(
                f"the drafter has {self.length} committed positions but was asked to append at {start_pos}: "
                "pass every committed position exactly once, in order"
            )
        mask = None
        if n > 1:
            # New positions see the cache and each other causally: (n, end) boolean, True = may attend.
            mask = self._positions[:end] <= self._positions[start_pos:end, None]
        out = self._run(
            h, e, self._cos[..., start_pos:end, :], self._sin[..., start_pos:end, :], mask, False, start_pos, True,
            self.decode_weights,
        )
        self.length = end  # a start_pos below length rewrites those positions: a free rollback
        return out[:, -1:]

    def _run(self, h, e, cos, sin, mask, causal, cache_pos, last=False, weights=None):
        """last=True: only the last position's output is wanted, so the last stage computes only that one
        (the split variant, which returns every stage, keeps all positions)."""
        last = last and self.variant != "split"
        x = F.linear(torch.cat([h, e], dim=-1), self.fuse[0].weight)  # (B, T, w)
        outs = []
        final = len(self.layers) - 1
        for s, layer in enumerate(self.layers):
            if s > 0 and self.variant != "token_once":
                x = F.linear(torch.cat([x, e], dim=-1), self.fuse[s].weight)
            x = layer(x, cos, sin, mask, causal, cache_pos, last and s == final, weights and weights[s])
            if self.variant == "split":
                outs.append(x)
        if self.variant == "split":
            x = torch.stack(outs, dim=-2)  # (B, T, S, w)
            if self.up is not None:
                return h.unsqueeze(-2) + self.up(x)
            return x
        if self.up is None:
            return x
        return (h[:, -x.shape[1] :] if last else h) + self.up(x)
