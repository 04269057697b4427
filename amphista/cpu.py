"""Linear layers for few-row forwards on the CPU.

A tree forward runs the target's linear layers on a handful of rows. MKL's sgemm, which `F.linear` calls
on the CPU, reads the weights at memory speed for one row but drops to a general kernel for 2-64 rows:
a 576 -> 1536 layer of SmolLM2 takes 72 us for 1 row and 171 / 391 us for 4 / 16 rows (1 thread), its
49,152-row lm_head 10 / 17 ms for 1 / 4. oneDNN's linear on weights reordered once into its blocked
layout takes 66 / 90 / 275 us and 7.3 / 5.9 ms for the same shapes: a 4-row forward costs little more
than a one-row one, which is what speculation needs. The same holds, inside a forward, for SmolLM2's
576 x 576 and 192 x 576 attention projections: with two threads, sgemm read their weights at about half the
packed layers' speed (117 and 40 us for one row, about one core's bandwidth), and packing them too took its
one-token forward from 39 to 37.5 ms and its 4- / 8- / 16-node tree forwards from 41 / 43 / 53 to 35-38 /
41 / 49-51 ms (2 threads). Layers under MIN_WEIGHTS (the bundled model's, 64 wide: per-call
overhead, not bytes) keep sgemm.

The weights are reordered once (a second copy in memory: the model's own tensors stay as they are, so
`state_dict`, training and moving the model keep working); the reordered copy is used only while the
layer's weight is the same CPU float32 tensor it was made from, and only outside autograd. The target is
frozen: its weights are not expected to change in place after loading.

A draft is the same kind of work: each of the drafter's projections runs on 1-4 rows, in bfloat16 on a
CPU that has it. `packed(weight)` gives drafting a reordered copy of one weight, float32 or bfloat16, kept
while the weight is unchanged; on SmolLM2's Amphista drafter it cut a draft's matmuls, whose weights come
from memory at every step (the target's forward in between evicts them), from 2.5 to 1.6 ms.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

# Weights per layer from which oneDNN beats sgemm for 1-16 rows inside a forward (SmolLM2's 110k-weight k/v
# projections gain; the bundled model's largest layer, 32k, is per-call overhead and keeps sgemm).
MIN_WEIGHTS = 1 << 16
# Batch-size hint for the reorder: the layout chosen for 16 rows serves 1-64 rows well.
ROWS_HINT = 16
ENV = "AMPHISTA_CPU_PACK"  # 0: keep sgemm everywhere


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def enabled() -> bool:
    """oneDNN linear is available and $AMPHISTA_CPU_PACK is not 0."""
    return available() and os.environ.get(ENV, "1") != "0"


def signature() -> int:
    """What cached timings depend on: the smallest packed layer, 0 where nothing is packed."""
    return MIN_WEIGHTS if enabled() else 0


class PackedLinear:
    """Replaces `layer.forward` with oneDNN's linear on a reordered copy of its weight."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        # The weight's data as reordered, held: while it lives no new tensor can take its address, so an equal
        # data_ptr means the same data, not memory the allocator handed out again after a cast.
        self.weight, self.data = layer.weight, layer.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.data, ROWS_HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if layer.weight is not self.weight or layer.weight.data_ptr() != self.data.data_ptr():
            # Moved, cast or replaced since it was reordered: the layer goes back to its own forward for good,
            # and the old data and its reordered copy are let go.
            if layer.__dict__.get("forward") is self:
                del layer.forward
            self.data = self.packed = None
            return F.linear(x, layer.weight, layer.bias)
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad))
        ):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, layer.bias, "none", [], "")
        return F.linear(x, layer.weight, layer.bias)


def pack_linears(model: nn.Module, min_weights: int = MIN_WEIGHTS) -> int:
    """Give every large float32 CPU `nn.Linear` of `model` a oneDNN-reordered weight; returns how many.
    Does nothing when oneDNN is unavailable or $AMPHISTA_CPU_PACK is 0; layers packed before are kept."""
    if not enabled():
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


class PackedWeight:
    """`x @ weight.T (+ bias)` through oneDNN on a reordered copy of `weight` (out, in); `add(base, x)` adds
    the product to `base` in the same call (a residual)."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        # Weakly: the cache of packed copies must not keep a dropped weight alive.
        self.weight, self.bias = weakref.ref(weight), bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)

    def __reduce__(self):
        # A reordered tensor neither copies nor pickles: a deep copy or an unpickled one packs its weight
        # (the copy's own, where the weight is copied with it, as a drafter's drafting weights are) again.
        return PackedWeight, (self.weight(), self.bias)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def add(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise.binary(x, base, self.packed, self.bias, "add")


# id(weight) -> (its state when packed, PackedWeight, its data), dropped when the weight is. Not an attribute of the
# weight: a Parameter pickles its attributes, and a reordered oneDNN tensor does not pickle.
_PACKED: dict[int, tuple] = {}


def _state(t: torch.Tensor | None) -> tuple:
    if t is None:
        return ()
    try:
        version = t._version  # bumped by every in-place change: an optimizer step, a copy_
    except RuntimeError:  # an inference tensor has none, and changes only inside inference mode
        version = -1
    return t.data_ptr(), version, t.dtype, tuple(t.shape)


def packable(weight: torch.Tensor, min_weights: int | None = None) -> bool:
    """Whether `packed` would pack this weight: a float32 or bfloat16 CPU matrix of at least `min_weights`
    (default MIN_WEIGHTS) entries, oneDNN with the dtype here, $AMPHISTA_CPU_PACK not 0."""
    return (
        weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.numel() >= (MIN_WEIGHTS if min_weights is None else min_weights)
        and (weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and _bf16()))
        and enabled()
    )


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). There oneDNN's bfloat16 GEMMs
    run 3-6x faster than float32 ones (the development VM: 430-470 against 70-130 GFLOP/s on 2 threads for
    SmolLM2-sized layers over 4,096 rows); elsewhere it emulates them, slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _bf16() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def packed(weight: torch.Tensor, bias: torch.Tensor | None = None, min_weights: int | None = None, owner=None):
    """A PackedWeight for inference with `weight` (out, in) and `bias`, made on first use and again whenever
    either has changed since (in place, moved, cast); None where F.linear / torch.mm stays (see packable).
    `owner`: the tensor `weight` is a view of, when that view is made afresh at every call (the copy is
    kept with the owner). Only for use outside autograd: the product carries no gradient."""
    if not packable(weight, min_weights):
        return None
    state = (_state(weight), _state(bias))
    owner = weight if owner is None else owner
    key = id(owner)
    entry = _PACKED.get(key)
    if entry is None or entry[0] != state:
        if entry is None:
            weakref.finalize(owner, _PACKED.pop, key, None)
        with torch.no_grad():
            # The data is held with its copy, as in PackedLinear: an equal data_ptr is then the same data.
            entry = _PACKED[key] = (state, PackedWeight(weight, bias), weight.detach())
    return entry[1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, owner=None) -> torch.Tensor:
    """F.linear, through a packed copy of `weight` (see packed) when autograd and autocast are off and x
    matches it."""
    if not torch.is_grad_enabled() and x.dtype == weight.dtype and not torch.is_autocast_enabled("cpu"):
        p = packed(weight, bias, owner=owner)
        if p is not None:
            return p.mm(x)
    return F.linear(x, weight, bias)
