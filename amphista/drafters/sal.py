"""Staged Adaptation Layers: causal decoder layers along time over fuse(h_t, embed(x_{t+1})).

They are causal, so in decoding they keep their own KV cache, one entry per committed position, written
by position index into a buffer sized by `reset(max_length)`. Rejected tree nodes never reach it: the
decoder only ever passes committed positions.

Batched decoding (`reset_rows` / `step_rows`) keeps a second cache with a slot per row, each row at its
own length. Its rows' new positions arrive left-aligned and padded; the padding's k/v go to one spare
position past `max_length`, which no query attends to, so they never overwrite a committed entry.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cpu import linear
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
        # Batched decoding, see reset_rows.
        self.capacity = self.rows_max_length = 0
        self.row_lengths: torch.Tensor | None = None  # (capacity,) committed positions per slot
        self.row_first: torch.Tensor | None = None  # (capacity,) first position a slot's queries may see
        self._row_positions = self._row_rope = self._row_bias = None

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

    def reset_rows(self, capacity: int, max_length: int, device, dtype) -> None:
        """Batched decoding: forget every row; a slot of max_length positions, plus the spare one for
        padding, for each of `capacity` rows."""
        for layer in self.layers:
            layer.attn.allocate_row_cache(capacity, max_length + 1, device, dtype)
        self.decode_weights = [layer.weights(decode=True) for layer in self.layers]
        length = self.layers[0].attn.row_cache.shape[3]  # a reused cache may be longer
        self._row_positions = torch.arange(max(length, capacity), device=device)
        cos, sin = rope_tables(self._row_positions[:length], self.inv_freq, dtype)  # (3, 1, 1, L, hd)
        # (L, 2, 3, hd): one gather by position gives every row's cos and sin for q, k and v.
        self._row_rope = torch.stack([cos, sin])[:, :, 0, 0].permute(2, 0, 1, 3).contiguous()
        self._row_bias = torch.tensor([0.0, float("-inf")], device=device, dtype=dtype).unbind()
        self.capacity, self.rows_max_length = capacity, max_length
        self.row_lengths = torch.zeros(capacity, dtype=torch.long, device=device)
        self.row_first = torch.zeros(capacity, dtype=torch.long, device=device)

    def grow_rows(self, max_length: int, device, dtype) -> None:
        """Room for `max_length` positions per row, keeping every row's committed entries."""
        if max_length <= self.rows_max_length:
            return
        if self.layers[0].attn.row_cache.shape[3] > max_length:  # kept from a longer batch: room already
            self.rows_max_length = max_length
            return
        old = [layer.attn.row_cache for layer in self.layers]
        lengths, first = self.row_lengths, self.row_first
        for layer in self.layers:
            layer.attn.row_cache = None
        self.reset_rows(self.capacity, max_length, device, dtype)
        for layer, cache in zip(self.layers, old):
            keep = cache.shape[3] - 1  # not the old spare position
            layer.attn.row_cache[:, : self.capacity, :, :keep] = cache[:, : self.capacity, :, :keep]
        self.row_lengths.copy_(lengths)
        self.row_first.copy_(first)

    def move_row(self, src: int, dst: int) -> None:
        for layer in self.layers:
            cache = layer.attn.row_cache
            cache[:, dst].copy_(cache[:, src])
        self.row_lengths[dst] = self.row_lengths[src]
        self.row_first[dst] = self.row_first[src]

    def skip_rows(self, slots: list[int], positions: list[int]) -> None:
        """Slot slots[i] forgets every position before positions[i] and continues from there."""
        index = torch.tensor(slots, device=self.row_lengths.device)
        at = torch.tensor(positions, device=self.row_lengths.device)
        self.row_lengths[index] = at
        self.row_first[index] = at

    def step_rows(self, h, e, start, count, rows: slice) -> torch.Tensor:
        """Batched decoding: append row b's positions start[b] .. start[b]+count[b]-1 (h, e (B, n, d), the
        real entries left-aligned, the rest padding) to slot rows.start+b; returns each row's last real
        position's output, (B, d) or (B, S, d) for the split variant."""
        B, n = h.shape[:2]
        first, stop, step = rows.indices(self.capacity)
        if step != 1 or stop - first != B:
            raise InputError(
                f"rows={rows} must be a slice of {B} state slots, within the {self.capacity} that "
                "drafter.reset_rows(capacity, max_length) made"
            )
        rows = slice(first, stop)  # the cache may have more slots than capacity: no open-ended slice
        if n > self.rows_max_length:
            raise InputError(
                f"{n} new positions per row but the drafter's SAL cache holds {self.rows_max_length}: call "
                "drafter.reset_rows(capacity, max_length) with the full sequence length"
            )
        lengths = self.row_lengths[rows]
        end = start + count
        # One host sync: the checks, and the key range, which bounds every row's attention.
        gap, fewest, high = torch.stack([(start - lengths).max(), count.min(), end.max()]).tolist()
        if high > self.rows_max_length:
            raise InputError(
                f"the drafter's SAL cache holds {self.rows_max_length} positions per row but position "
                f"{high - 1} was asked for: call drafter.reset_rows(capacity, max_length) with the full "
                "sequence length"
            )
        if gap > 0 or fewest < 1:
            raise InputError(
                f"rows at {lengths.tolist()} committed positions were asked to append {count.tolist()} at "
                f"{start.tolist()}: pass every committed position exactly once, in order, at least one per row"
            )
        offsets, index = self._row_positions[:n], self._row_positions[:B]
        spare = self.layers[0].attn.row_cache.shape[3] - 1
        wpos = torch.where(offsets < count[:, None], start[:, None] + offsets, spare)  # (B, n)
        cos, sin = self._row_rope[wpos].permute(2, 3, 0, 1, 4).unsqueeze(3)  # each (3, B, 1, n, hd)
        split = self.variant == "split"
        # Additive masks, made once per step (SDPA would turn a boolean one into this in every layer): causal
        # by position, and padding, at the spare position, sees anything.
        keys, (zero, blocked) = self._row_positions[:high], self._row_bias
        # What a skip left behind is not attended to; a start below the skip (a new sequence in the slot)
        # starts the row's history afresh.
        self.row_first[rows] = torch.minimum(self.row_first[rows], start)
        first = self.row_first[rows][:, None, None, None]
        mask = torch.where((keys <= wpos[:, None, :, None]) & (keys >= first), zero, blocked)  # (B, 1, n, high)
        last = count - 1
        last_mask = None
        if not split:  # the last stage's queries: each row's last real position only
            last_mask = torch.where((keys <= (end - 1)[:, None, None, None]) & (keys >= first), zero, blocked)
        kv = [layer.attn.row_cache[:, rows] for layer in self.layers]
        lengths.copy_(end)  # a start below the length rewrites those positions: a free rollback
        x = linear(torch.cat([h, e], dim=-1), self.fuse[0].weight)  # (B, n, w)
        outs = []
        final = len(self.layers) - 1
        for s, layer in enumerate(self.layers):
            if s > 0 and self.variant != "token_once":
                x = linear(torch.cat([x, e], dim=-1), self.fuse[s].weight)
            weights = self.decode_weights[s]
            if split or s < final:
                x = layer.forward_rows(x, cos, sin, kv[s], wpos, mask, index, weights=weights)
            else:  # as step's last=True: attention and the MLP for the last real position only
                x = layer.forward_rows(x, cos, sin, kv[s], wpos, last_mask, index, last, weights=weights).view(B, -1)
            if split:
                outs.append(x)
        if split:
            x = torch.stack(outs, dim=-2)[index, last]  # (B, S, w)
            return x if self.up is None else h[index, last].unsqueeze(-2) + self.up(x)
        return x if self.up is None else h[index, last] + self.up(x)

    def _run(self, h, e, cos, sin, mask, causal, cache_pos, last=False, weights=None):
        """last=True: only the last position's output is wanted, so the last stage computes only that one
        (the split variant, which returns every stage, keeps all positions)."""
        last = last and self.variant != "split"
        x = linear(torch.cat([h, e], dim=-1), self.fuse[0].weight)  # (B, T, w)
        outs = []
        final = len(self.layers) - 1
        for s, layer in enumerate(self.layers):
            if s > 0 and self.variant != "token_once":
                x = linear(torch.cat([x, e], dim=-1), self.fuse[s].weight)
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
