"""Step-time cost model of `tree="auto"` (the per-step choice it feeds is amphista/policy.py).

Whether a token tree pays depends on how much more a forward over n tokens per row costs than a one-token
forward, and that depends on the number of live rows: a small batch on a GPU reads the weights once
whatever the tokens (a 64-node tree is nearly free), a full batch or a CPU is compute-bound (every node
costs its share). So the cost of one target forward is measured once per model, drafter and machine on a
(rows, tokens per row) grid and cached; `policy.TreePolicy` then picks, for the current number of rows, the
tree with the most expected committed tokens per second -- down to plain decoding where no tree pays. See
docs/cost-model.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import cpu
from .errors import InputError
from .sources import cache_file, read_cached, write_cached

OVERRIDE_ENV = "AMPHISTA_COST_MODEL"  # a cost-model JSON file used instead of the cache
ROWS = (1, 2, 4, 8, 16)
TOKENS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Verification and bookkeeping per row per step; a guess that `TreePolicy.observe` corrects where it is off.
DEFAULT_OVERHEAD_S = 1e-4
BUDGET_S = 20.0
LOOKS = 8  # passes over the whole grid after the first, as the budget allows (see calibrate)
FORMAT_VERSION = 1
# Part of the cache key: a change to how calibration measures makes every cached model stale.
CALIBRATION = 7


def _interp(points: list[tuple[int, float]], x: float) -> float:
    """Piecewise linear through points sorted by x. Beyond the last point: the line through the last two,
    but never below the last value (an extrapolation must not price an unmeasured larger forward below a
    measured one). Before the first: the first value (calibration always measures 1 row and 1 token)."""
    if len(points) == 1 or x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return max(y1, y1 + (y1 - y0) * (x - x1) / (x1 - x0))


def _seconds(value, what: str) -> float:
    s = float(value)
    if not math.isfinite(s) or s < 0:
        raise InputError(f"{what} is {value!r}: seconds must be a finite number >= 0")
    return s


def _count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{what} is {value!r}: it must be a positive integer")
    return value


@dataclass(frozen=True)
class CostModel:
    """Measured step costs. `forward` need not be a full grid: calibration under a time budget leaves
    out the largest points, and each row count is interpolated over the token counts it has."""

    forward: dict[tuple[int, int], float]  # (rows, tokens per row) -> seconds of one target forward
    draft: dict[int, float] = field(default_factory=dict)  # rows -> seconds of one draft call
    overhead_s: float = DEFAULT_OVERHEAD_S  # per row per step: verification and bookkeeping

    def __post_init__(self):
        if not self.forward:
            raise InputError("a cost model needs at least one measured forward")
        by_rows: dict[int, list[tuple[int, float]]] = {}
        for (r, t), s in sorted(self.forward.items()):
            by_rows.setdefault(r, []).append((t, s))
        object.__setattr__(self, "_by_rows", by_rows)
        object.__setattr__(self, "_draft", sorted(self.draft.items()))

    def forward_s(self, rows: int, tokens: int) -> float:
        """Seconds of one forward of `tokens` tokens in each of `rows` rows: interpolated in tokens within
        each measured row count, then in rows."""
        return _interp([(r, _interp(pts, tokens)) for r, pts in self._by_rows.items()], rows)

    def draft_s(self, rows: int) -> float:
        return _interp(self._draft, rows) if self._draft else 0.0

    def step_s(self, rows: int, nodes: int) -> float:
        """Seconds of one decoding step verifying `nodes` tokens per row (1: plain decoding, no draft)."""
        draft = self.draft_s(rows) if nodes > 1 else 0.0
        return self.forward_s(rows, nodes) + draft + rows * self.overhead_s

    def to_json(self) -> dict:
        return {
            "version": FORMAT_VERSION,
            "forward": [[r, t, s] for (r, t), s in sorted(self.forward.items())],
            "draft": [[r, s] for r, s in sorted(self.draft.items())],
            "overhead_s": self.overhead_s,
        }

    @classmethod
    def from_json(cls, data) -> CostModel:
        """Raises InputError, naming the problem, on anything but the format `to_json` writes."""
        if not isinstance(data, dict) or not isinstance(data.get("forward"), list):
            raise InputError('a cost model is a JSON object {"forward": [[rows, tokens, seconds], ...], ...}')
        if data.get("version", FORMAT_VERSION) != FORMAT_VERSION:
            raise InputError(f"cost model format version {data['version']!r} is not {FORMAT_VERSION}")
        try:
            forward = {
                (_count(r, "rows"), _count(t, "tokens")): _seconds(s, f"forward ({r}, {t})")
                for r, t, s in data["forward"]
            }
            draft = {_count(r, "rows"): _seconds(s, f"draft ({r})") for r, s in data.get("draft") or []}
            overhead = _seconds(data.get("overhead_s", DEFAULT_OVERHEAD_S), "overhead_s")
        except InputError:
            raise
        except (TypeError, ValueError) as e:
            raise InputError(
                f"malformed cost model ({e}): forward is [[rows, tokens, seconds], ...], "
                "draft [[rows, seconds], ...]"
            ) from None
        return cls(forward, draft, overhead)

    def describe(self) -> str:
        """A text table in milliseconds; `~` marks interpolated values."""
        rows = sorted({r for r, _ in self.forward})
        tokens = sorted({t for _, t in self.forward})
        lines = ["target forward, ms (rows down, tokens per row across; ~ interpolated)"]
        lines.append("rows " + "".join(f"{t:>9}" for t in tokens))
        for r in rows:
            cells = []
            for t in tokens:
                mark = "" if (r, t) in self.forward else "~"
                cells.append(f"{mark}{self.forward_s(r, t) * 1e3:.3f}".rjust(9))
            lines.append(f"{r:>4} " + "".join(cells))
        if self.draft:
            cells = (f"{r} rows {s * 1e3:.3f}" for r, s in sorted(self.draft.items()))
            lines.append("draft call, ms: " + ", ".join(cells))
        else:
            lines.append("draft call: not measured (counted as free)")
        lines.append(f"overhead: {self.overhead_s * 1e3:.3f} ms per row per step")
        return "\n".join(lines)


def _timed_call(measure: Callable, args: tuple) -> tuple[float | None, float]:
    """(what one call of `measure` reports, or None; seconds it is charged: the larger of what it reports and
    its wall time, so setup counts against the budget)."""
    start = time.perf_counter()
    s = measure(*args)
    wall = time.perf_counter() - start
    return (None, wall) if s is None else (float(s), max(float(s), wall))


def _fastest_timed(measure: Callable, args: tuple, repeats: int) -> tuple[float | None, float]:
    """(fastest of `repeats` results after one warm-up or None if the measure returned None, seconds spent).
    The fastest, not the median: other processes on the machine only ever add time to a measurement."""
    spent, results = 0.0, []
    for i in range(repeats + 1):
        s, charged = _timed_call(measure, args)
        spent += charged
        if s is None:
            return None, spent
        if i:
            results.append(s)
    return min(results), spent


def _work(point: tuple[int, int]) -> tuple[int, int]:
    """The order calibration measures forwards in: rows x tokens, then tokens."""
    return point[0] * point[1], point[1]


def calibrate(
    measure_forward: Callable[[int, int], float],
    measure_draft: Callable[[int], float | None] | None = None,
    rows: tuple[int, ...] = ROWS,
    tokens: tuple[int, ...] = TOKENS,
    repeats: int = 3,
    overhead_s: float = DEFAULT_OVERHEAD_S,
    budget_s: float = BUDGET_S,
    looks: int = LOOKS,
) -> CostModel:
    """Measure a `CostModel`: each point is the fastest of `repeats` calls after one warm-up and of up to
    `looks` more calls, one per pass over the whole grid (later looks). Other processes on the machine only
    ever add time, so the fastest call is the cost, and a point that is cheaper than a smaller one is kept as
    measured: on the development machine a 4-token step of SmolLM2 costs less than a 2-token one (oneDNN
    picks another kernel for 4 rows of a matrix product than for 2), and `auto` must see that.

    measure_forward(rows, tokens) runs one real batched forward (at a typical cache length) and returns its
    seconds; measure_draft(rows) returns a draft call's seconds, or None where it cannot be measured.
    The draft is measured first for every row count, then the forward grid in order of increasing work
    (rows x tokens). Then the later looks: every point once more per pass, passes alternating between the
    opposite order and this one, the first always, the others while they fit the budget. A burst of other
    work lasts seconds and raises the points measured during it; with the looks spread over the whole
    calibration it has to hit a point in every pass to raise it (three calls in a row, one look: fresh
    calibrations of the bundled model put a 1-row step 10-20% apart from one another, and `auto`'s one-row
    choice with them). A point whose cost, predicted from the points measured so far, would take the
    first pass past `budget_s` is skipped and later interpolated: on a slow machine the largest batches of
    the largest trees, which `auto` rarely picks, are extrapolated from smaller ones. The first point of
    each kind is always measured.
    """
    rows, tokens = sorted(set(rows)), sorted(set(tokens))
    calls = repeats + 2  # warm-up, repeats, the first later look
    spent, draft, forward = 0.0, {}, {}  # spent: measured so far plus the first later look still to come
    for r in rows if measure_draft is not None else ():
        if draft and spent + _interp(sorted(draft.items()), r) * calls > budget_s:
            continue
        s, cost = _fastest_timed(measure_draft, (r,), repeats)
        spent += cost
        if s is not None:
            draft[r] = s
            spent += s
    for r, t in sorted(((r, t) for r in rows for t in tokens), key=_work):
        if forward and spent + CostModel(forward).forward_s(r, t) * calls > budget_s:
            continue
        forward[(r, t)], cost = _fastest_timed(measure_forward, (r, t), repeats)
        spent += cost + forward[(r, t)]
    spent -= sum(forward.values()) + sum(draft.values())  # the first look is charged as it runs
    for look in range(looks):
        if look and spent + sum(forward.values()) + sum(draft.values()) > budget_s:
            break
        backwards = look % 2 == 0
        for table, measure, order in ((forward, measure_forward, _work), (draft, measure_draft, None)):
            for point in sorted(table, key=order, reverse=backwards):
                s, charged = _timed_call(measure, point if isinstance(point, tuple) else (point,))
                spent += charged
                if s is not None:
                    table[point] = min(table[point], s)
    return CostModel(forward, draft, overhead_s)


def cache_path(key: dict) -> Path:
    """Where the cost model of `key` is cached: <cache root>/costs/<sha256 of the key>.json."""
    return cache_file("costs", key)


def cost_key(model_config, dtype, device, drafter: dict | None = None) -> dict:
    """The cache key of a cost model: everything that changes step times. `model_config` is a Hugging Face
    config (or its dict), `drafter` a description of the drafter (its type and config), hashed."""
    cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    fields = ("_name_or_path", "architectures", "model_type", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
    device = torch.device(device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    drafter_hash = None
    if drafter is not None:
        text = json.dumps(drafter, sort_keys=True, default=str)
        drafter_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
    return {
        "model": {k: cfg.get(k) for k in fields},
        "dtype": str(dtype),
        "drafter": drafter_hash,
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "calibration": CALIBRATION,
        "cpu_pack": cpu.signature(),
    }


def load_or_calibrate(
    key: dict,
    measure_forward: Callable[[int, int], float],
    measure_draft: Callable[[int], float | None] | None = None,
    **options,
) -> CostModel:
    """The cached cost model of `key`, calibrated (and cached) when there is none; `options` are calibrate's
    (rows, tokens, repeats, overhead_s, budget_s).

    $AMPHISTA_COST_MODEL, when set, names a cost-model JSON file used as is (its key, if any, is not
    checked); a broken one raises InputError. A cache file that cannot be read or parsed, or that holds
    another key, is recalibrated and rewritten atomically; a cache that cannot be written only costs a
    calibration next time."""
    override = os.environ.get(OVERRIDE_ENV)
    if override:
        try:
            data = json.loads(Path(override).expanduser().read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(
                f"${OVERRIDE_ENV} names {override!r}, which cannot be read as JSON ({e})"
            ) from None
        try:
            return CostModel.from_json(data)
        except InputError as e:
            raise InputError(f"${OVERRIDE_ENV} file {override!r}: {e}") from None
    data = read_cached("costs", key)
    if data is not None:
        try:
            return CostModel.from_json(data)
        except InputError:  # a malformed model: calibrate again
            pass
    model = calibrate(measure_forward, measure_draft, **options)
    write_cached("costs", key, model.to_json())
    return model
