"""Linear layers for few-row forwards on the CPU.

A tree forward runs the target's linear layers on a handful of rows. MKL's sgemm, which `F.linear` calls
on the CPU, reads the weights at memory speed for one row but drops to a general kernel for 2-64 rows:
a 576 -> 1536 layer of SmolLM2 takes 72 us for 1 row and 171 / 391 us for 4 / 16 rows (1 thread), its
49,152-row lm_head 10 / 17 ms for 1 / 4. oneDNN's linear on weights reordered once into its blocked
layout takes 66 / 90 / 275 us and 7.3 / 5.9 ms for the same shapes: a 4-row forward costs little more
than a one-row one, which is what speculation needs. Small layers (under ~0.5M weights, e.g. a 3-head
k/v projection) are faster with sgemm and keep it.

The weights are reordered once (a second copy in memory: the model's own tensors stay as they are, so
`state_dict`, training and moving the model keep working); the reordered copy is used only while the
layer's weight is the same CPU float32 tensor it was made from, and only outside autograd. The target is
frozen: its weights are not expected to change in place after loading.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# Weights per layer from which oneDNN beats sgemm for 1-16 rows (measured on AVX-512, 1 thread).
MIN_WEIGHTS = 1 << 19
# Batch-size hint for the reorder: the layout chosen for 16 rows serves 1-64 rows well.
ROWS_HINT = 16
ENV = "AMPHISTA_CPU_PACK"  # 0: keep sgemm everywhere


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear:
    """Replaces `layer.forward` with oneDNN's linear on a reordered copy of its weight."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.weight, self.ptr = layer.weight, layer.weight.data_ptr()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), ROWS_HINT)
        self.original = layer.forward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if (
            layer.weight is self.weight
            and layer.weight.data_ptr() == self.ptr  # not moved or cast since it was reordered
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad))
        ):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, layer.bias, "none", [], "")
        return F.linear(x, layer.weight, layer.bias)


def pack_linears(model: nn.Module, min_weights: int = MIN_WEIGHTS) -> int:
    """Give every large float32 CPU `nn.Linear` of `model` a oneDNN-reordered weight; returns how many.
    Does nothing when oneDNN is unavailable or $AMPHISTA_CPU_PACK is 0; layers packed before are kept."""
    if os.environ.get(ENV, "1") == "0" or not available():
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or isinstance(module.__dict__.get("forward"), PackedLinear):
            continue
        w = module.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or w.numel() < min_weights:
            continue
        module.forward = PackedLinear(module)
        count += 1
    return count


def unpack_linears(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), PackedLinear):
            del module.forward
