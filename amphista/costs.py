"""Step-time cost model and the per-step tree choice of `tree="auto"`.

Whether a token tree pays depends on how much more a forward over n tokens per row costs than a one-token
forward, and that depends on the number of live rows: a small batch on a GPU reads the weights once
whatever the tokens (a 64-node tree is nearly free), a full batch or a CPU is compute-bound (every node
costs its share). So the cost of one target forward is measured once per model, drafter and machine on a
(rows, tokens per row) grid and cached; `TreePolicy` then picks, for the current number of rows, the tree
with the most expected committed tokens per second -- down to plain decoding where no tree pays. See
docs/cost-model.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from . import cpu
from .errors import InputError
from .sources import cache_file, read_cached, write_cached
from .tree import HeadAccuracy, TreeSpec, accepted_by_depth, build_tree

OVERRIDE_ENV = "AMPHISTA_COST_MODEL"  # a cost-model JSON file used instead of the cache
ROWS = (1, 2, 4, 8, 16)
TOKENS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
TREE_SIZES = (2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)
# Verification and bookkeeping per row per step; a guess that `TreePolicy.observe` corrects where it is off.
DEFAULT_OVERHEAD_S = 1e-4
BUDGET_S = 20.0
FORMAT_VERSION = 1
# Part of the cache key: a change to how calibration measures makes every cached model stale.
CALIBRATION = 6


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


def _fastest_timed(measure: Callable, args: tuple, repeats: int) -> tuple[float | None, float]:
    """(fastest of `repeats` results after one warm-up or None if the measure returned None, seconds spent).
    The fastest, not the median: other processes on the machine only ever add time to a measurement.
    Each call is charged the larger of what it reports and its wall time (setup counts against the budget)."""
    spent, results = 0.0, []
    for i in range(repeats + 1):
        start = time.perf_counter()
        s = measure(*args)
        wall = time.perf_counter() - start
        if s is None:
            return None, spent + wall
        spent += max(float(s), wall)
        if i:
            results.append(float(s))
    return min(results), spent


def calibrate(
    measure_forward: Callable[[int, int], float],
    measure_draft: Callable[[int], float | None] | None = None,
    rows: tuple[int, ...] = ROWS,
    tokens: tuple[int, ...] = TOKENS,
    repeats: int = 3,
    overhead_s: float = DEFAULT_OVERHEAD_S,
    budget_s: float = BUDGET_S,
) -> CostModel:
    """Measure a `CostModel`: each point is the fastest of `repeats` calls after one warm-up and of one more call
    made after the whole grid (a second look). Other processes on the machine only ever add time, so the
    fastest call is the cost, and a point that is cheaper than a smaller one is kept as measured: on the
    development machine a 4-token step of SmolLM2 costs less than a 2-token one (oneDNN picks another kernel
    for 4 rows of a matrix product than for 2), and `auto` must see that.

    measure_forward(rows, tokens) runs one real batched forward (at a typical cache length) and returns its
    seconds; measure_draft(rows) returns a draft call's seconds, or None where it cannot be measured.
    The draft is measured first for every row count, then the forward grid in order of increasing work
    (rows x tokens), then every point once more in the opposite order: a burst of other work on the machine
    has to hit a point in both passes to raise it. A point whose cost, predicted from the points measured
    so far, would take the calibration past `budget_s` is skipped and later interpolated: on a slow machine
    the largest batches of the largest trees, which `auto` rarely picks, are extrapolated from smaller ones.
    The first point of each kind is always measured.
    """
    rows, tokens = sorted(set(rows)), sorted(set(tokens))
    calls = repeats + 2  # warm-up, repeats, second look
    spent, draft, forward = 0.0, {}, {}  # spent: measured so far plus the second looks still to come
    for r in rows if measure_draft is not None else ():
        if draft and spent + _interp(sorted(draft.items()), r) * calls > budget_s:
            continue
        s, cost = _fastest_timed(measure_draft, (r,), repeats)
        spent += cost
        if s is not None:
            draft[r] = s
            spent += s
    for r, t in sorted(((r, t) for r in rows for t in tokens), key=lambda p: (p[0] * p[1], p[1])):
        if forward and spent + CostModel(forward).forward_s(r, t) * calls > budget_s:
            continue
        forward[(r, t)], cost = _fastest_timed(measure_forward, (r, t), repeats)
        spent += cost + forward[(r, t)]
    for point in sorted(forward, key=lambda p: (p[0] * p[1], p[1]), reverse=True):
        forward[point] = min(forward[point], float(measure_forward(*point)))
    for r in sorted(draft, reverse=True):
        again = measure_draft(r)
        if again is not None:
            draft[r] = min(draft[r], float(again))
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


class Candidate(NamedTuple):
    nodes: int  # tokens verified per row, root included; 1 = plain decoding
    tree: TreeSpec | None
    tau: float  # expected committed tokens per step
    by_depth: tuple[float, ...] = ()  # expected accepted drafts at depth 1, 2, ... (tau = 1 + their sum)

    def tau_at(self, gain: float) -> float:
        """tau when each level of the tree is accepted `gain` times as often as the level above promises:
        gain**d scales depth d (a drafter worse on this text than on its evaluation data loses most deep)."""
        return 1.0 + sum(v * gain ** (d + 1) for d, v in enumerate(self.by_depth))


def _solve_gain(candidate: Candidate, accepted: float) -> float:
    """The gain in [0, 2] at which `candidate` expects `accepted` drafts per step (bisection: monotone; 16
    halvings leave it within 3e-5, far below what the choice between trees can tell apart)."""
    low, high = 0.0, 2.0
    if candidate.tau_at(high) - 1.0 <= accepted:
        return high
    for _ in range(16):
        mid = 0.5 * (low + high)
        if candidate.tau_at(mid) - 1.0 < accepted:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


@functools.cache
def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normals]: 0 for one, 0.56 for 2, 1.03 / 1.42 / 1.77 for 4 / 8 / 16.
    E[max] = integral of x * n * pdf(x) * cdf(x)^(n-1), by the trapezoid rule on [-10, 10] (error < 1e-6)."""
    if n <= 1:
        return 0.0
    step, total = 0.005, 0.0
    for i in range(4001):
        x = -10.0 + i * step
        pdf = math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        cdf = 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
        total += (0.5 if i in (0, 4000) else 1.0) * x * n * pdf * cdf ** (n - 1)
    return total * step


def _bucket(rows: int) -> int:
    """The power of two at or above `rows`: row counts that share an online correction."""
    return 1 << (max(rows, 1) - 1).bit_length()


class TreePolicy:
    """Chooses the tree of each step for the number of live rows: the candidate maximising
    rows * tau / step_s(rows, nodes), where plain decoding (tau 1, no draft) is a candidate.

    It needs the drafter's head accuracies (per-head cumulative top-k lists, or a `HeadAccuracy` with
    measured path frequencies; for greedy decoding those of `load_accuracies(path, greedy=True)`). A drafter
    without them has no policy: the caller uses a fixed tree."""

    ALPHA = 0.1  # weight of one observation in the online correction
    STEP = math.log(2.0)  # bound on one observation's log(measured / predicted) pull: a hiccup moves little
    FORGET = 0.0002  # per observation, how far the other candidates' log corrections relax back to 0
    # A tree is chosen over plain decoding only when predicted faster by margin(rows). One row: noise only.
    # Under speculation the rows of a fixed batch (generate_batch) finish at different steps (plain rows of
    # one length finish together) and the batch waits for its slowest row, whose lag behind the mean grows as
    # the expected maximum of `rows` draws: TAIL times that. The ragged tail of few-row steps ate about 20% of
    # a 16-row batch's time on the bundled model, 1.77 (the expected maximum of 16 standard normals) x TAIL.
    # A server's rows wait for nobody: a finished row's slot takes the next request (ragged=False).
    SINGLE_MARGIN = 0.05
    TAIL = 0.113
    # After a plain step, a tree must beat plain decoding by this much more, whatever the row count: the first tree
    # step after plain ones drafts from every position the drafter has not seen (up to BatchEngine.CATCH_UP),
    # and a policy flipping on noise would pay that again and again.
    SWITCH = 0.15
    REVISIT = 8  # observations between two rankings of the candidates
    GAIN_ALPHA = 0.02  # weight of one step in the moving average of observed / expected accepted tokens
    GAIN_PRIOR = 5  # the accuracies' promise counts as this many observed steps
    # Per plain step, how far the observed acceptance relaxes back toward the accuracies' promise (half-life
    # ~460 plain steps). Plain steps measure no acceptance: without this, a few unlucky answers early on
    # (MT-Bench's extraction questions, a warm-up on odd text) made plain decoding final for the process.
    # With it the trees are tried again now and then; the first REVISIT tree steps after plain ones weigh
    # PROBE_ALPHA each, so a drafter that is still wrong sends it back at once (a useless drafter: ~5% of
    # steps are such probes).
    GAIN_RELAX = 0.0015
    PROBE_ALPHA = 0.1

    def __init__(self, cost: CostModel, accuracies, max_depth: int | None = None, max_nodes: int = 64):
        acc = list(accuracies)[: max_depth or None]
        paths = getattr(accuracies, "paths", None)
        if paths is not None:
            acc = HeadAccuracy(acc, {p: f for p, f in paths.items() if len(p) <= len(acc)})
        self.cost = cost
        self.candidates = [Candidate(1, None, 1.0)]
        for n in TREE_SIZES:
            if n > max_nodes:
                break
            tree = build_tree(acc, n)
            if tree.num_nodes > self.candidates[-1].nodes:  # fewer nodes than asked: the tree is exhausted
                by_depth = tuple(accepted_by_depth(tree, acc))
                self.candidates.append(Candidate(tree.num_nodes, tree, 1.0 + sum(by_depth), by_depth))
        self._index = {c.nodes: i for i, c in enumerate(self.candidates)}
        self.max_nodes = self.candidates[-1].nodes  # cache slots a step may need beyond a row's length
        # (rows bucket, nodes) -> moving average of log(measured / predicted step time)
        self._log_ratio: dict[tuple[int, int], float] = {}
        self._base: dict[int, list[float]] = {}  # rows -> predicted step seconds per candidate
        self._choice: dict[int, Candidate] = {}
        self._was_plain = False  # the latest step decoded plainly (its drafter fell behind)
        self._observations = 0
        # Observed / expected accepted tokens beyond the first, as a moving average (see observe).
        self._gain = 1.0
        self._gain_stale = False  # observations moved the means since `gain` was last solved for
        self._gain_steps = 0
        self._observed = self._promised = 0.0  # means of accepted / promised drafts per step (see observe)
        self._gain_candidate: Candidate | None = None  # the tree whose steps last measured the gain
        self._after_plain = False  # the latest observed step was plain
        self._probe_steps = 0  # tree steps left that weigh PROBE_ALPHA in the gain (see GAIN_RELAX)

    def _predicted(self, rows: int) -> list[float]:
        base = self._base.get(rows)
        if base is None:
            base = self._base[rows] = [max(self.cost.step_s(rows, c.nodes), 1e-12) for c in self.candidates]
        return base

    def _rates(self, rows: int) -> list[float]:
        """Predicted committed tokens per second of each candidate, corrected by observations."""
        bucket, gain = _bucket(rows), self.gain
        plain = self._log_ratio.get((bucket, 1))  # the machine, for every tree too; None: not measured yet
        rates = []
        for c, s in zip(self.candidates, self._predicted(rows)):
            # A tree's own measurements, but never less slowed than the machine is now (see observe).
            own = self._log_ratio.get((bucket, c.nodes)) if c.nodes > 1 else None
            correction = max((v for v in (own, plain) if v is not None), default=0.0)
            rates.append(rows * c.tau_at(gain) / (s * math.exp(correction)))
        return rates

    def _best(self, rows: int, fresh: bool = False, ragged: bool = True) -> Candidate:
        switching = self._was_plain and not fresh
        choice = self._choice.get((rows, switching, ragged))
        if choice is None:
            rates, best = self._rates(rows), 0
            margin = self.margin(rows, ragged)
            if switching:  # leaving plain decoding costs a catch-up draft: no flapping
                margin += self.SWITCH
            # Ties go to the smaller tree; a tree that commits a single token never wins, and a tree must
            # beat plain decoding by margin(rows).
            for i in range(1, len(rates)):
                if (
                    self.candidates[i].tau > 1.0
                    and rates[i] > rates[best]
                    and rates[i] > rates[0] * (1.0 + margin)
                ):
                    best = i
            choice = self._choice[(rows, switching, ragged)] = self.candidates[best]
        return choice

    @classmethod
    def margin(cls, rows: int, ragged: bool = True) -> float:
        """How much faster than plain decoding a tree must be predicted to be chosen for `rows` live rows:
        0.05 for one row, then 0.11 / 0.17 / 0.21 / 0.25 for 2 / 4 / 8 / 16 (see TAIL); 0.05 whatever the rows
        where they are not `ragged` (a finished row's slot is refilled: nothing waits for the slowest row)."""
        return cls.SINGLE_MARGIN + (cls.TAIL * expected_max_normal(rows) if ragged else 0.0)

    def choose(self, rows: int, fresh: bool = False, ragged: bool = True) -> TreeSpec | None:
        """The tree for a step with `rows` live rows, or None for plain decoding. `fresh`: the choice is for
        new sequences, whose drafter reads the prompt whatever was chosen before, so leaving plain decoding
        costs no catch-up draft and needs no SWITCH margin (the single-sequence path chooses per call).
        `ragged`: the rows are a fixed set that all have to finish (see margin)."""
        if fresh:
            return self._best(rows, fresh=True, ragged=ragged).tree
        tree = self._best(rows, ragged=ragged).tree
        if (tree is None) != self._was_plain:  # the switch margin changed: choices made under it are stale
            self._was_plain = tree is None
            self._choice.clear()
        return tree

    def observe(self, rows: int, nodes: int, seconds: float, tokens: float | None = None) -> None:
        """Feed back a measured step time, so that a calibration that is off (another process on the cores,
        a cache length unlike the calibration's) heals. Per (rows bucket, nodes), a moving average of
        log(measured / predicted) rescales that candidate's predicted cost: a tree slower than predicted
        loses to the next best, which is then measured in turn. Plain decoding's average is a floor for every
        candidate of its bucket (it measures the machine: a slower machine slows every step alike), so a tree
        is costed at the larger of its own average and plain decoding's. One observation pulls the average by at
        most ALPHA * STEP (a 10x hiccup moves it 7%). Only the chosen candidate is measured, so the others'
        corrections relax back to none (half-life ~3,500 steps of their bucket): a tree judged slow by a
        passing load is tried again rather than excluded for good.

        `tokens`, the mean tokens each row committed in that step, feeds a second correction: `gain`, the
        moving average of observed / expected accepted drafts, scales every tree's expected gain over
        plain decoding (accuracies measured on other text than the one being decoded promise too much or
        too little for every tree alike). Plain steps relax it back toward the promise (GAIN_RELAX)."""
        if seconds <= 0 or nodes not in self._index:
            return
        candidate = self.candidates[self._index[nodes]]
        if tokens is not None and candidate.tau > 1.0:
            # Drafts accepted less (or more) often than the accuracies promise. The means are plain over the
            # first steps, moving averages after: the first answer already corrects a promise that was off.
            # Means of observed and promised accepted drafts, then the gain at which the tree just used would
            # promise their ratio: a ratio of means, as one step's 0..depth accepted drafts is too coarse a
            # measure to invert on its own.
            if self._gain_steps == 0:  # the accuracies' promise, as if observed GAIN_PRIOR times
                self._observed = self._promised = candidate.tau - 1.0
            self._gain_steps += 1
            alpha = max(self.GAIN_ALPHA, 1.0 / (self._gain_steps + self.GAIN_PRIOR))
            if self._after_plain:
                self._after_plain, self._probe_steps = False, self.REVISIT
            if self._probe_steps:
                self._probe_steps -= 1
                alpha = max(alpha, self.PROBE_ALPHA)
            self._observed += alpha * (max(float(tokens) - 1.0, 0.0) - self._observed)
            self._promised += alpha * ((candidate.tau - 1.0) - self._promised)
            self._gain_candidate = candidate
            self._update_gain()
        elif candidate.tau == 1.0 and self._gain_candidate is not None:
            self._after_plain = True
            if self._observed < self._promised:
                self._observed += self.GAIN_RELAX * (self._promised - self._observed)
                self._update_gain()
        sample = math.log(seconds / self._predicted(rows)[self._index[nodes]])
        bucket = _bucket(rows)
        # Plain steps measure the machine: a tree is costed at the larger of its own correction and plain
        # decoding's (_rates), so a machine that slows down while decoding plainly does not make trees measured
        # before look cheaper. Corrections are absolute, not relative to plain decoding's: added to it, a
        # slowdown the trees measured first would count twice and keep them out for good.
        for c in self.candidates:
            log_ratio = self._log_ratio.get((bucket, c.nodes), 0.0)
            if c.nodes == nodes:
                step = min(max(sample - log_ratio, -self.STEP), self.STEP)
                self._log_ratio[(bucket, c.nodes)] = log_ratio + self.ALPHA * step
            elif log_ratio:
                self._log_ratio[(bucket, c.nodes)] = log_ratio * (1.0 - self.FORGET)
        # Choose again every REVISIT observations, not after each: one step moves the averages a few percent
        # at most, and re-ranking every candidate costs ~2% of a 16-row step of the bundled model.
        self._observations += 1
        if self._observations % self.REVISIT == 0:
            self._choice.clear()

    def _update_gain(self) -> None:
        # Solved when next read, not per observation: a bisection per step cost a plain 16-row step of the
        # bundled model ~3%, and the choice reads it once every REVISIT steps.
        self._gain_stale = True

    @property
    def gain(self) -> float:
        """Observed / expected accepted drafts, as the gain at which the tree that measured them promises
        their ratio (see observe); 1.0 before any tree step."""
        if self._gain_stale:
            self._gain_stale = False
            candidate = self._gain_candidate
            ratio = self._observed / self._promised if self._promised > 0 else 1.0
            self._gain = _solve_gain(candidate, ratio * (candidate.tau - 1.0))
        return self._gain

    def table(self, rows_list=ROWS) -> list[dict]:
        """Per row count: the chosen size, its expected tau and predicted tokens/s, and plain decoding's."""
        out = []
        for rows in rows_list:
            choice, rates = self._best(rows), self._rates(rows)
            out.append({
                "rows": rows,
                "nodes": choice.nodes,
                "tau": choice.tau,
                "tokens_per_s": rates[self._index[choice.nodes]],
                "plain_tokens_per_s": rates[0],
            })
        return out
