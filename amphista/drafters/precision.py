"""The dtype a drafter drafts in: the target's, or bfloat16 where that measures faster on this CPU.

A drafting step reads all of the drafter's weights (and, with a shared lm_head and a draft vocabulary,
the target's rows for it) for one or a few rows: it runs at memory speed, so halving the bytes nearly
halves its time on a CPU with native bfloat16 matmuls, while a CPU without them runs bfloat16 slower. The
dtype only changes which tokens are proposed, never the output (the target verifies every draft in its own
dtype), so commands choose it by measurement: once per drafter shape and machine, then cached, like the
thread count (amphista/threads.py).
"""

from __future__ import annotations

import copy
import time

import torch

from .. import cpu
from ..errors import InputError
from ..sources import read_cached, write_cached

REPEATS = 8
PREFIX = 128  # committed positions before the timed drafts: a SAL cache of a typical prompt's length
GAIN = 0.85  # bfloat16 must draft in at most this share of float32's time to be chosen
NAMES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
         "bf16": torch.bfloat16}


def parse_dtype(name: str):
    """'auto', 'float32' / 'fp32' or 'bfloat16' / 'bf16' -> "auto" or a torch dtype."""
    try:
        return NAMES[str(name).lower()]
    except KeyError:
        raise InputError(
            f"drafter dtype {name!r} is not one of auto, float32, bfloat16: pass one of them"
        ) from None


def _key(drafter, target) -> dict:
    from ..bench.environment import cpu_model
    from ..threads import usable_cores

    config = getattr(drafter, "config", None)
    return {
        "drafter": type(drafter).__name__,
        "config": getattr(config, "__dict__", None),
        "target": str(target.dtype),
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_pack": cpu.signature(),
    }


@torch.inference_mode()
def _draft_seconds(drafter) -> float:
    """Fastest of REPEATS one-row drafts of every head (two new positions each) after PREFIX positions."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, PREFIX, drafter.hidden_size, generator=g).to(drafter.device)
    tokens = torch.randint(drafter.vocab_size, (1, PREFIX), generator=g).to(drafter.device)
    drafter.reset(PREFIX + 2 * (REPEATS + 1))
    drafter.draft_topk(hidden, tokens, 0, drafter.num_heads, 4)
    best, pos = float("inf"), PREFIX
    for _ in range(REPEATS + 1):
        t0 = time.perf_counter()
        drafter.draft_topk(hidden[:, :2], tokens[:, :2], pos, drafter.num_heads, 4)
        best = min(best, time.perf_counter() - t0)
        pos += 2
    return best


def drafting_dtype(drafter, target) -> torch.dtype:
    """bfloat16 if it drafts in at most GAIN of float32's time here, else float32, for a drafter on a float32
    CPU target; the target's dtype anywhere else. Measured on first use (a second), then read from
    <cache root>/draft_dtype/. `drafter` is left as found."""
    from .common import HeadDrafter

    if target.device.type != "cpu" or target.dtype != torch.float32 or not isinstance(drafter, HeadDrafter):
        return target.dtype
    key = _key(drafter, target)
    data = read_cached("draft_dtype", key)
    if data is not None and data.get("dtype") in ("float32", "bfloat16"):
        return getattr(torch, data["dtype"])
    base = drafter if drafter.dtype == torch.float32 else copy.deepcopy(drafter).float()
    seconds = {"float32": _draft_seconds(base), "bfloat16": _draft_seconds(copy.deepcopy(base).bfloat16())}
    best = "bfloat16" if seconds["bfloat16"] <= GAIN * seconds["float32"] else "float32"
    write_cached("draft_dtype", key, {"dtype": best, "seconds": seconds})
    return getattr(torch, best)


def for_drafting(drafter, target, dtype="auto"):
    """`drafter` on the target's device in the dtype it should draft in: `dtype` as given (a torch dtype or
    a name for parse_dtype), or for "auto" the one `drafting_dtype` chose."""
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    drafter = drafter.to(device=target.device, dtype=target.dtype if dtype == "auto" else dtype)
    if dtype == "auto":
        chosen = drafting_dtype(drafter, target)
        if chosen != drafter.dtype:
            drafter = drafter.to(dtype=chosen)
    return drafter
