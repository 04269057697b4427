"""How many CPU threads torch should use for a target: measured once per model and machine, then cached.

Few-row forwards of a small model are bound by per-op overhead and memory, not arithmetic: a second
thread can cost more in synchronisation than it brings (the bundled model decodes fastest on one), while
a model of 100M+ parameters may gain from it. Commands run without `--threads` use the count this module
measured fastest: one plain decoding step (1 token) plus one small tree (8 tokens), after 64 cached
positions, for 1, 2, 4, ... threads up to the cores this process may use.
"""

from __future__ import annotations

import os
import time

import torch

from . import cpu
from .sources import read_cached, write_cached

REPEATS = 5


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def candidates(cores: int | None = None) -> list[int]:
    """1, 2, 4, ... up to `cores` (the usable cores), which always ends the list."""
    cores = usable_cores() if cores is None else cores
    out, n = [], 1
    while n < cores:
        out.append(n)
        n *= 2
    return out + [cores]


def _key(target) -> dict:
    from .bench.environment import cpu_model

    cfg = target.text_config
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    return {
        "model": [target.architecture, target.name_or_path, *(getattr(cfg, f, None) for f in fields)],
        "dtype": str(target.dtype),
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "torch": torch.__version__,
        "cpu_pack": cpu.signature(),
    }


@torch.inference_mode()
def _time_step(target) -> float:
    from .kv_cache import TreeCache

    device = target.device
    cache = TreeCache(target.num_layers, 64 + 1 + 8)
    prompt = torch.randint(target.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    target.forward(prompt.to(device), position_ids=torch.arange(64, device=device)[None], cache=cache)
    best = float("inf")
    for _ in range(REPEATS + 1):
        total = 0.0
        for q in (1, 8):
            ids = torch.zeros(1, q, dtype=torch.long, device=device)
            t0 = time.perf_counter()
            target.forward(ids, position_ids=torch.arange(64, 64 + q, device=device)[None], cache=cache)
            total += time.perf_counter() - t0
            cache.truncate(64)
        best = min(best, total)
    return best


def fastest_threads(target) -> int:
    """The thread count under which `target` (a TargetModel on the CPU) runs a decoding step fastest; measured
    on first use (a second or two), then read from <cache root>/threads/. Leaves torch's setting as found."""
    key = _key(target)
    data = read_cached("threads", key)
    if data is not None and isinstance(data.get("threads"), int) and data["threads"] >= 1:
        return data["threads"]
    before = torch.get_num_threads()
    seconds = {}
    try:
        for n in candidates():
            torch.set_num_threads(n)
            seconds[n] = _time_step(target)
    finally:
        torch.set_num_threads(before)
    best = min(seconds, key=seconds.get)
    write_cached("threads", key, {"threads": best, "seconds": {str(n): s for n, s in seconds.items()}})
    return best


def set_threads(target, requested: int | None) -> int:
    """Use `requested` threads, or on the CPU the count measured fastest for `target`; returns the count."""
    if requested is None and target.device.type == "cpu":
        requested = fastest_threads(target)
    if requested is not None:
        torch.set_num_threads(requested)
    return torch.get_num_threads()
