"""Auto-embedding Block: the K head vectors attend to each other, bidirectionally.

Each group of K vectors (one per drafting position) is an independent length-K sequence with full
attention and no cache. The block is a residual branch: out = h' + delta, where delta is what its layers
add on top of their input. The position embedding shapes what the layers compute but is not on the skip
path, so an untrained block (zero residual branches) is exactly the identity.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import AmphistaConfig
from .layers import INIT_STD, DecoderLayer, normal_, rope_inv_freq, rope_tables, zero_


def sinusoidal_table(length: int, width: int) -> torch.Tensor:
    """(length, width) Vaswani et al. table, on the CPU."""
    pos = torch.arange(length, dtype=torch.float32, device="cpu").unsqueeze(1)
    div = torch.exp(
        torch.arange(0, width, 2, dtype=torch.float32, device="cpu") * (-math.log(10000.0) / width)
    )
    table = torch.zeros(length, width, device="cpu")
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : width // 2]
    return table


class AutoEmbeddingBlock(nn.Module):
    def __init__(self, cfg: AmphistaConfig):
        super().__init__()
        d, w, K = cfg.hidden_size, cfg.aeb_width, cfg.num_heads
        same = w == d
        self.layers = nn.ModuleList(
            DecoderLayer(w, cfg.head_dim, cfg.ffn_size(w), cfg.rms_norm_eps, zero_branches=same)
            for _ in range(cfg.aeb_layers)
        )
        # Narrow AEB: down-project in, and a zero-initialised up-projection carries the delta out.
        self.down = None if same else normal_(nn.Linear(d, w, bias=False))
        self.up = None if same else zero_(nn.Linear(w, d, bias=False))
        self.kind = cfg.position_embedding
        self.pe = None
        if self.kind == "learned":
            self.pe = nn.Parameter(torch.randn(K, w) * INIT_STD)
        # Fixed tables live on the CPU and are moved once per device/dtype (see _tables): not buffers, so
        # a drafter built on `meta` and loaded from safetensors needs no special casing.
        self._fixed: dict = {}
        self.decode_weights: list | None = None  # per layer, see prepare_decode
        if self.kind == "sinusoidal":
            self._fixed["cpu"] = (sinusoidal_table(K, w), None)
        elif self.kind == "rotary":
            positions = torch.arange(K, device="cpu")
            self._fixed["cpu"] = rope_tables(positions, rope_inv_freq(cfg.head_dim, 1e4), torch.float32)

    def _tables(self, x: torch.Tensor):
        # Tables made while drafting (inference mode) cannot enter autograd: keep separate copies.
        key = (x.device, x.dtype, torch.is_inference_mode_enabled())
        if key not in self._fixed:
            self._fixed[key] = tuple(
                None if t is None else t.to(x.device, x.dtype) for t in self._fixed["cpu"]
            )
        return self._fixed[key]

    def prepare_decode(self) -> None:
        """Gather the layers' drafting weights (DecoderLayer.weights); forward(decode=True) reads them."""
        self.decode_weights = [layer.weights(decode=True) for layer in self.layers]

    def forward(self, x: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """x (N, K, d): N independent groups -> (N, K, d). decode=True reads the weights prepare_decode
        gathered (a drafter calls it at reset)."""
        weights = self.decode_weights if decode else None
        z0 = x if self.down is None else self.down(x)  # (N, K, w)
        cos = sin = None
        if self.kind == "learned":
            z0 = z0 + self.pe
        elif self.kind == "sinusoidal":
            z0 = z0 + self._tables(z0)[0]
        elif self.kind == "rotary":
            cos, sin = self._tables(z0)
        z = z0
        for i, layer in enumerate(self.layers):
            z = layer(z, cos, sin, weights=weights and weights[i])  # no mask: every head sees every other head
        delta = z - z0
        return x + (delta if self.up is None else self.up(delta))
