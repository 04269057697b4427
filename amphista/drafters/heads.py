"""Medusa-style per-head pieces: K stacks of ResBlocks and the vocabulary projection.

Weights of the K heads are stacked in one tensor so that a draft call costs one matmul per layer,
not K module calls: at the bundled model's size Python overhead, not FLOPs, sets the drafter's cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu import linear


class ResBlocks(nn.Module):
    """K independent stacks of `num_layers` ResBlocks, x + SiLU(W x + b), W and b zero at init."""

    def __init__(self, num_heads: int, width: int, num_layers: int):
        super().__init__()
        self.num_heads, self.width = num_heads, width
        # weight[l, k] is head k's layer-l matrix in nn.Linear's (out, in) layout.
        self.weight = nn.Parameter(torch.zeros(num_layers, num_heads, width, width))
        self.bias = nn.Parameter(torch.zeros(num_layers, num_heads, width))

    def forward(self, x: torch.Tensor, per_head: bool = False) -> torch.Tensor:
        """x (..., d) read by every head, or (..., K, d) with per_head=True -> (..., K, d)."""
        K, d = self.num_heads, self.width
        start = 0
        if not per_head:
            # One (K*d, d) matmul serves all heads' first layer.
            y = linear(x, self.weight[0].view(K * d, d), self.bias[0].view(K * d), owner=self.weight)
            x = x.unsqueeze(-2) + F.silu(y.view(*x.shape[:-1], K, d))
            start = 1
        for layer in range(start, self.weight.shape[0]):
            y = torch.einsum("...ki,koi->...ko", x, self.weight[layer]) + self.bias[layer]
            x = x + F.silu(y)
        return x


class VocabProjection(nn.Module):
    """K heads initialised from the target's lm_head, or the shared frozen lm_head after an RMSNorm.

    With separate heads an untrained head IS the target's lm_head (its rows for the draft vocabulary when
    the config has one). The shared head's norm (weight 1)
    rescales each h by 1/rms(h): same ranking, so the same draft tree, at a different temperature;
    head_norm=False makes it exact.
    """

    def __init__(self, num_heads, width, vocab_size, shared, head_norm, head_bias, eps):
        super().__init__()
        self.shared = shared
        self.norm = nn.RMSNorm(width, eps=eps) if shared and head_norm else None
        self.weight = None if shared else nn.Parameter(torch.zeros(num_heads, vocab_size, width))
        self.bias = nn.Parameter(torch.zeros(num_heads, vocab_size)) if head_bias and not shared else None

    @classmethod
    def from_config(cls, c) -> VocabProjection:
        """From a MedusaConfig or AmphistaConfig (both carry the same head fields)."""
        return cls(
            c.num_heads, c.hidden_size, c.head_vocab_size, c.shared_lm_head, c.head_norm, c.head_bias, c.rms_norm_eps
        )

    @torch.no_grad()
    def init_from(self, lm_head: nn.Module, d2t: torch.Tensor | None = None) -> None:
        """Start every separate head as the target's lm_head, restricted to the rows d2t names."""
        if self.shared:
            return
        w, b = lm_head.weight, getattr(lm_head, "bias", None)
        if d2t is not None:
            rows = d2t.to(w.device)
            w, b = w[rows], (None if b is None else b[rows])
        self.weight.copy_(w.unsqueeze(0).expand_as(self.weight))
        if self.bias is not None and b is not None:
            self.bias.copy_(b.unsqueeze(0).expand_as(self.bias))

    def forward(self, x: torch.Tensor, lm_head: nn.Module | None) -> torch.Tensor:
        """x (..., D, d), the features of the first D <= K heads -> logits (..., D, V), V the draft
        vocabulary's size when there is one (`lm_head` is then the target's rows for it). Drafting a shallow
        tree passes D < K: the deeper heads' vocabulary matmuls, the drafter's largest, are skipped."""
        if not self.shared:
            weight, bias, depth = self.weight, self.bias, x.shape[-2]
            if depth != weight.shape[0]:
                weight, bias = weight[:depth], (None if bias is None else bias[:depth])
            # Batched matmuls where they fit: they cost half of einsum's dispatch, which at drafting sizes
            # is most of the call. (N, D, d) is what einsum does anyway, down to the output's strides.
            if x.dim() == 2:  # one position (drafting)
                logits = torch.bmm(x.unsqueeze(1), weight.transpose(1, 2)).squeeze(1)
            elif x.dim() == 3:  # one position per row (batched drafting), or training's (n, K, d)
                logits = torch.bmm(x.transpose(0, 1), weight.transpose(1, 2)).transpose(0, 1)
            else:
                logits = torch.einsum("...kd,kvd->...kv", x, weight)
            return logits if bias is None else logits + bias
        if self.norm is not None:
            x = self.norm(x)
        if isinstance(lm_head, nn.Module):  # the target's own: its forward may run a packed copy already
            return lm_head(x.to(lm_head.weight.dtype)).to(x.dtype)
        w = lm_head.weight
        return linear(x.to(w.dtype), w, lm_head.bias).to(x.dtype)
