"""Llama-style transformer pieces shared by the SAL (causal, cached) and the AEB (bidirectional).

The attention module optionally writes into a pre-allocated KV buffer by position index (gpt-fast style),
so appending committed positions costs one slice copy and a rollback costs nothing.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu import PackedWeight, packed

INIT_STD = 0.02  # Hugging Face Llama's initializer_range


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    # Created on the CPU on purpose: not a buffer, so building on `meta` and loading stays simple.
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (T,) or (B, T) integer -> cos, sin, each (3, B or 1, 1, T, hd), Llama's half-split RoPE
    laid out to rotate a stacked (3, B, H, T, hd) q/k/v tensor in one go (see rotate).

    Row 2 (v) is cos = 1, sin = 0: v passes through exactly. sin carries rotate_half's sign, so that
    rotate_half(x) * sin == x.roll(hd / 2) * signed_sin."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)  # (..., T, hd/2)
    cos, sin = freqs.cos(), freqs.sin()
    cos = torch.cat([cos, cos], dim=-1)
    sin = torch.cat([-sin, sin], dim=-1)
    cos, sin = cos.reshape(-1, 1, *cos.shape[-2:]), sin.reshape(-1, 1, *sin.shape[-2:])  # (B or 1, 1, T, hd)
    cos = torch.stack([cos, cos, torch.ones_like(cos)])
    sin = torch.stack([sin, sin, torch.zeros_like(sin)])
    return cos.to(dtype), sin.to(dtype)


def rotate(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """qkv (3, B, H, T, hd) -> q and k rotated, v unchanged; three ops, which matters per draft call."""
    return torch.addcmul(qkv * cos, qkv.roll(qkv.shape[-1] // 2, dims=-1), sin)


@functools.cache
def _norm_constants(width: int, eps: float, device: torch.device, dtype: torch.dtype):
    """sqrt(eps * width) and sqrt(width) as tensors: a Python scalar operand costs a tensor op of its own."""
    return (
        torch.tensor((eps * width) ** 0.5, device=device, dtype=dtype),
        torch.tensor(width**0.5, device=device, dtype=dtype),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """nn.RMSNorm: x * weight / sqrt(mean(x^2) + eps). Half precision keeps F.rms_norm's fp32 statistics; in
    fp32 it is written out, as F.rms_norm costs as much as six separate ops on the CPU. Drafting uses a
    cheaper form of the same value (see _norm and DecoderLayer.weights)."""
    if x.dtype != torch.float32:  # the weight cast too: under autocast a float32 one misses the fused kernel
        return F.rms_norm(x, weight.shape, weight.to(x.dtype), eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def normal_(linear: nn.Linear) -> nn.Linear:
    nn.init.normal_(linear.weight, std=INIT_STD)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


def zero_(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class Attention(nn.Module):
    """The weights and KV buffer of one attention block; DecoderLayer.forward runs it."""

    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.n_heads, self.head_dim = width // head_dim, head_dim
        self.qkv = normal_(nn.Linear(width, 3 * width, bias=False))
        self.o = normal_(nn.Linear(width, width, bias=False))
        self.kv_cache: torch.Tensor | None = None  # (2, 1, H, max_length, hd), see allocate_cache
        self.row_cache: torch.Tensor | None = None  # (2, capacity, H, length, hd), see allocate_row_cache

    def allocate_cache(self, max_length: int, device, dtype) -> None:
        c = self.kv_cache
        if c is None or c.shape[3] < max_length or c.dtype != dtype or c.device != torch.device(device):
            self.kv_cache = torch.empty(
                2, 1, self.n_heads, max_length, self.head_dim, device=device, dtype=dtype
            )

    def allocate_row_cache(self, capacity: int, length: int, device, dtype) -> None:
        """The batched cache, a slot of `length` positions per row. Zeros, not empty: a row's batch-mates
        may be longer, so its attention spans positions it never wrote, and masking does not clean NaN
        garbage there (NaN - inf is NaN). Once written, every entry stays finite, so a reused one needs
        no clearing."""
        c = self.row_cache
        if (
            c is None or c.shape[1] < capacity or c.shape[3] < length or c.dtype != dtype
            or c.device != torch.device(device)
        ):
            self.row_cache = torch.zeros(
                2, capacity, self.n_heads, length, self.head_dim, device=device, dtype=dtype
            )


class SwiGLU(nn.Module):
    """The weights of one SwiGLU MLP; DecoderLayer.forward runs it."""

    def __init__(self, width: int, ffn: int):
        super().__init__()
        self.ffn = ffn
        self.gate_up = normal_(nn.Linear(width, 2 * ffn, bias=False))
        self.down = normal_(nn.Linear(ffn, width, bias=False))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm x), then + mlp(norm x). `zero_branches` makes it the identity."""

    def __init__(self, width: int, head_dim: int, ffn: int, eps: float, zero_branches: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(width, eps=eps)
        self.attn = Attention(width, head_dim)
        self.mlp_norm = nn.RMSNorm(width, eps=eps)
        self.mlp = SwiGLU(width, ffn)
        if zero_branches:
            # The residual branches start at zero so that an untrained drafter is exactly Medusa's.
            zero_(self.attn.o)
            zero_(self.mlp.down)

    def weights(self, decode: bool = False) -> tuple:
        """Everything forward reads, in one tuple: the projections as transposed views, the norm weights and
        the norm constant -- eps, or for drafting (decode=True) the tensor of the scalar-free RMSNorm, with
        sqrt(width) folded into copies of the (vector) norm weights. A drafter gathers the decode tuple once
        per sequence, at reset, and drafts with the weights as they were then: at the bundled model's size,
        module attribute lookups and F.linear's transposes cost as much as the arithmetic of a step. A large
        projection drafts through a oneDNN-packed copy instead (amphista/cpu.py), where that is available."""
        attn, mlp, norm = self.attn, self.mlp, self.attn_norm
        norm1, norm2, consts = norm.weight, self.mlp_norm.weight, norm.eps
        project = (lambda w: w.t()) if not decode else (lambda w: packed(w) or w.t())
        if decode:
            consts, sqrt_d = _norm_constants(norm1.shape[0], norm.eps, norm1.device, norm1.dtype)
            norm1, norm2 = norm1 * sqrt_d, norm2 * sqrt_d
        return (
            project(attn.qkv.weight),
            project(attn.o.weight),
            project(mlp.gate_up.weight),
            project(mlp.down.weight),
            norm1,
            norm2,
            consts,
            attn,
            mlp.ffn,
        )

    def forward(self, x, cos=None, sin=None, mask=None, causal=False, cache_pos=None, last=False, weights=None):
        """x (B, T, w) -> (B, T, w). With cache_pos, k/v go to the attention's buffer at cache_pos.. and the
        queries attend to everything up to there (mask then orders the new positions among themselves).
        last=True (with cache_pos) returns the last position only, (B, 1, w): every position's k/v still
        goes to the cache, but attention and the MLP run on one row, which needs no mask. `weights` is a
        tuple from weights(decode=True), for drafting; None reads the parameters afresh.

        Written inline on the weights, with no submodule calls: a draft runs every layer once per step, and
        at the bundled model's size each module call and tensor op costs about as much as its arithmetic.
        """
        qkv_w, o_w, gate_up_w, down_w, norm1, norm2, consts, attn, ffn = weights or self.weights()
        B, T, W = x.shape
        x = x.reshape(B * T, W)  # rows: 2D matmuls
        h = _norm(x, norm1, consts)
        qkv = _mm(h, qkv_w).view(B, T, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        if cos is not None:
            qkv = rotate(qkv, cos, sin)  # (3, B, H, T, hd)
        q, k, v = qkv
        if cache_pos is not None:
            end = cache_pos + T
            attn.kv_cache[:, :, :, cache_pos:end] = qkv[1:]
            k, v = attn.kv_cache[:, :, :, :end]
            if last and T > 1:
                q, mask, x, T = q[:, :, -1:], None, x.view(B, T, W)[:, -1], 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, T, hd)
        x = _residual(x, y.transpose(1, 2).reshape(B * T, W), o_w, consts)
        gate, up = _mm(_norm(x, norm2, consts), gate_up_w).split(ffn, dim=-1)
        return _residual(x, F.silu(gate) * up, down_w, consts).view(B, T, W)


    def forward_rows(self, x, cos, sin, kv, wpos, mask, index, last=None, *, weights):
        """Drafting several sequences at once: x (B, T, w), each row's positions left-aligned -> (B, T, w).
        k/v go to kv (2, B, H, L, hd), a view of the rows' slots, at positions wpos (B, T); the queries
        attend to the first Lk positions under mask (B, 1, T, Lk), an SDPA attn_mask. index is arange(B).
        last (B,): only position last[b] of row b is wanted, (B, 1, w), with mask (B, 1, 1, Lk) for it (as
        forward's last). `weights` is a tuple from weights(decode=True)."""
        qkv_w, o_w, gate_up_w, down_w, norm1, norm2, consts, attn, ffn = weights
        B, T, W = x.shape
        x = x.reshape(B * T, W)
        h = _norm(x, norm1, consts)
        qkv = _mm(h, qkv_w).view(B, T, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        qkv = rotate(qkv, cos, sin)  # (3, B, H, T, hd)
        kv[:, index[:, None], :, wpos] = qkv[1:].permute(1, 3, 0, 2, 4)  # (B, T, 2, H, hd) into (2, B, H, L, hd)
        k, v = kv[..., : mask.shape[-1], :]
        q = qkv[0]
        if last is not None:
            q, x, T = q[index, :, last].unsqueeze(2), x.view(B, T, W)[index, last], 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        x = _residual(x, y.transpose(1, 2).reshape(B * T, W), o_w, consts)
        gate, up = _mm(_norm(x, norm2, consts), gate_up_w).split(ffn, dim=-1)
        return _residual(x, F.silu(gate) * up, down_w, consts).view(B, T, W)


def _norm(x: torch.Tensor, weight: torch.Tensor, consts) -> torch.Tensor:
    if isinstance(consts, float):
        return rms_norm(x, weight, consts)
    # Drafting: sqrt(mean(x^2) + eps) * sqrt(d) == hypot(||x||, sqrt(eps * d)), with consts = sqrt(eps * d) and
    # sqrt(d) folded into weight: four ops and no Python-scalar operand, half the time of rms_norm's six.
    return x * weight / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), consts)


def _mm(x: torch.Tensor, w_t) -> torch.Tensor:
    """x @ w_t, w_t a transposed weight or a PackedWeight."""
    return w_t.mm(x) if type(w_t) is PackedWeight else torch.mm(x, w_t)


def _residual(x: torch.Tensor, a: torch.Tensor, w_t, consts) -> torch.Tensor:
    """x + a @ w_t. Drafting fuses the two into one call; training keeps them apart, so that under autocast the
    residual stream stays in full precision (addmm would cast x down with the product)."""
    if isinstance(consts, float):
        return x + torch.mm(a, w_t)
    return w_t.add(x, a) if type(w_t) is PackedWeight else torch.addmm(x, a, w_t)
