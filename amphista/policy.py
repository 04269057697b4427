"""The per-step tree choice of `tree="auto"`: for the number of live rows, the tree with the most expected
committed tokens per second under the measured step costs (amphista/costs.py), down to plain decoding where
no tree pays, corrected online by the steps it observes. See docs/cost-model.md.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

from .costs import ROWS, CostModel
from .tree import HeadAccuracy, TreeSpec, accepted_by_depth, build_tree

TREE_SIZES = (2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)


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


def _between(known: list[tuple[int, float]], nodes: int) -> float:
    """The correction at `nodes` from measured (nodes, correction) pairs, ascending, the first at one node:
    linear in log(nodes) between the nearest on either side, the largest's beyond it."""
    lo = max((k for k in known if k[0] <= nodes), key=lambda k: k[0])
    hi = min((k for k in known if k[0] >= nodes), key=lambda k: k[0], default=None)
    if hi is None or hi[0] == lo[0]:
        return lo[1] if hi is None else hi[1]
    t = math.log(nodes / lo[0]) / math.log(hi[0] / lo[0])
    return lo[1] + t * (hi[1] - lo[1])


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
    RELAX = 0.0035  # per tree step, how far other trees' corrections relax toward its own (half-life ~200)
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
    # and a policy flipping on noise would pay that again and again. A drafter that keeps no state (Medusa) has no
    # such draft: auto_policy gives its policy switch=0.
    SWITCH = 0.15
    REVISIT = 8  # observations between two rankings of the candidates
    # One ranking in EXPLORE_EVERY tries, instead of the best tree, the tree measured least lately among those
    # predicted within EXPLORE_WITHIN of it. Observations correct only the trees chosen, so a tree calibrated
    # too dear (a slow moment of the machine during its calibration) was never chosen and never corrected:
    # two bundled rows kept 6-node trees, which the calibration put 9% cheaper than 8-node ones, where the
    # two cost the same and 8 nodes decoded 7% faster. The cost: a few percent on one step in 16, at most.
    EXPLORE_EVERY = 16
    EXPLORE_WITHIN = 0.1
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
    # `gain` scales every size alike, but the accuracies can overstate one size more than its neighbours (on
    # SmolLM2's MT-Bench they promised Amphista's 5-node tree 0.13 more tau than the 4-node one; both accepted
    # 1.63). A dynamic tree's step tells exactly what each smaller tree would have accepted (observe's
    # `smaller`), so per size a moving average of those and of the 2-node tree's over the same steps: their
    # ratio, measured on the same text, corrects each size's tau relative to the tree the gain was fit to,
    # once SHAPE_MIN steps measured it.
    SHAPE_ALPHA = 0.02
    SHAPE_MIN = 16

    def __init__(
        self, cost: CostModel, accuracies, max_depth: int | None = None, max_nodes: int = 64, switch: float | None = None
    ):
        """`switch`: the SWITCH margin for leaving plain decoding; 0 for a drafter that keeps no state (its first
        draft after plain steps reads one position, as any other)."""
        acc = list(accuracies)[: max_depth or None]
        paths = getattr(accuracies, "paths", None)
        if paths is not None:
            acc = HeadAccuracy(acc, {p: f for p, f in paths.items() if len(p) <= len(acc)})
        self.cost = cost
        self.switch = self.SWITCH if switch is None else switch
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
        self._rankings = 0  # times the choices were cleared for a new ranking (see EXPLORE_EVERY)
        self._last_seen: dict[tuple[int, int], int] = {}  # (rows bucket, nodes) -> its latest observation
        # Observed / expected accepted tokens beyond the first, as a moving average (see observe).
        self._gain = 1.0
        self._gain_stale = False  # observations moved the means since `gain` was last solved for
        self._gain_steps = 0
        self._observed = self._promised = 0.0  # means of accepted / promised drafts per step (see observe)
        self._gain_candidate: Candidate | None = None  # the tree whose steps last measured the gain
        self._after_plain = False  # the latest observed step was plain
        self._probe_steps = 0  # tree steps left that weigh PROBE_ALPHA in the gain (see GAIN_RELAX)
        # nodes -> [steps, mean accepted drafts, the 2-node tree's mean over the same steps] (see SHAPE_ALPHA)
        self._shape: dict[int, list] = {}

    def _predicted(self, rows: int) -> list[float]:
        base = self._base.get(rows)
        if base is None:
            base = self._base[rows] = [max(self.cost.step_s(rows, c.nodes), 1e-12) for c in self.candidates]
        return base

    def _rates(self, rows: int) -> list[float]:
        """Predicted committed tokens per second of each candidate, corrected by observations."""
        bucket, gain = _bucket(rows), self.gain
        plain = self._log_ratio.get((bucket, 1))  # the machine, for every tree too; None: not measured yet
        # The calibration keeps the fastest of its repeats, so a measured step is slower than its prediction
        # by some percent whatever its size; a size not measured yet is costed from its measured neighbours (and
        # plain decoding's, 0 until measured), not at that optimism: uncorrected, every untried size looked a
        # few percent faster than the tried ones, and `auto` kept moving to them (3-node and 32-node trees
        # among 6-12-node ones on two bundled rows, 6-10% slower than a fixed 8-node tree).
        rates, known = [], self._measured(bucket)
        fitted = self._gain_candidate
        fitted_shape = self._shape_ratio(fitted.nodes) if fitted is not None else None
        for c, s in zip(self.candidates, self._predicted(rows)):
            # A tree measured is costed as measured; one not measured yet, from its measured neighbours but never
            # less slowed than the machine is now (see observe).
            correction = 0.0 if plain is None else plain
            if c.nodes > 1:
                own = self._own(bucket, c.nodes, known)
                correction = own if (bucket, c.nodes) in self._log_ratio else max(own, correction)
            tau = c.tau_at(gain)
            shape = self._shape_ratio(c.nodes) if fitted_shape and c.nodes > 1 else None
            if shape is not None:  # measured on the same steps as the tree the gain was fit to
                tau = 1.0 + (fitted.tau_at(gain) - 1.0) * shape / fitted_shape
            rates.append(rows * tau / (s * math.exp(correction)))
        return rates

    def _shape_ratio(self, nodes: int) -> float | None:
        """Drafts the `nodes`-node tree accepted per draft the 2-node tree accepted on the same steps, or None
        until SHAPE_MIN steps measured it (see SHAPE_ALPHA)."""
        entry = self._shape.get(nodes)
        if entry is None or entry[0] < self.SHAPE_MIN or entry[2] < 0.05:
            return None
        return entry[1] / entry[2]

    def _measured(self, bucket: int) -> list[tuple[int, float]]:
        """(nodes, log correction) of the sizes measured in `bucket`, ascending, plain decoding's first (0 until
        measured): what an unmeasured size's correction is interpolated from."""
        plain = self._log_ratio.get((bucket, 1))
        known = [(1, 0.0 if plain is None else plain)]
        return known + sorted((n, v) for (b, n), v in self._log_ratio.items() if b == bucket and n > 1)

    def _own(self, bucket: int, nodes: int, known: list[tuple[int, float]] | None = None) -> float:
        """A tree size's log correction: its own moving average, or interpolated from the measured sizes
        (`known`, as _measured gives it)."""
        own = self._log_ratio.get((bucket, nodes))
        return own if own is not None else _between(self._measured(bucket) if known is None else known, nodes)

    def _best(self, rows: int, fresh: bool = False, ragged: bool = True) -> Candidate:
        switching = self._was_plain and not fresh
        choice = self._choice.get((rows, switching, ragged))
        if choice is None:
            exploring = self._rankings % self.EXPLORE_EVERY == self.EXPLORE_EVERY - 1
            choice = self._choice[(rows, switching, ragged)] = self._rank(rows, switching, ragged, exploring)
        return choice

    def _rank(self, rows: int, switching: bool, ragged: bool, exploring: bool) -> Candidate:
        rates, best = self._rates(rows), 0
        margin = self.margin(rows, ragged)
        if switching:  # leaving plain decoding costs a catch-up draft: no flapping
            margin += self.switch
        # Ties go to the smaller tree; a tree that commits a single token never wins, and a tree must beat plain
        # decoding by margin(rows).
        pays = [
            i for i in range(1, len(rates))
            if self.candidates[i].tau > 1.0 and rates[i] > rates[0] * (1.0 + margin)
        ]
        for i in pays:
            if rates[i] > rates[best]:
                best = i
        if best and exploring:
            close = [i for i in pays if i != best and rates[i] >= rates[best] * (1.0 - self.EXPLORE_WITHIN)]
            if close:
                bucket = _bucket(rows)
                best = min(close, key=lambda i: self._last_seen.get((bucket, self.candidates[i].nodes), -1))
        return self.candidates[best]

    @classmethod
    def margin(cls, rows: int, ragged: bool = True) -> float:
        """How much faster than plain decoding a tree must be predicted to be chosen for `rows` live rows:
        0.05 for one row, then 0.11 / 0.17 / 0.21 / 0.25 for 2 / 4 / 8 / 16 (see TAIL); 0.05 whatever the rows
        where they are not `ragged` (a finished row's slot is refilled: nothing waits for the slowest row)."""
        return cls.SINGLE_MARGIN + (cls.TAIL * expected_max_normal(rows) if ragged else 0.0)

    def choose(self, rows: int, fresh: bool = False, ragged: bool = True) -> TreeSpec | None:
        """The tree for a step with `rows` live rows, or None for plain decoding. `fresh`: the choice is for
        new sequences, whose drafter reads the prompt whatever was chosen before, so leaving plain decoding
        costs no catch-up draft and needs no SWITCH margin (a sequence's first step).
        `ragged`: the rows are a fixed set that all have to finish (see margin)."""
        if fresh:
            return self._best(rows, fresh=True, ragged=ragged).tree
        tree = self._best(rows, ragged=ragged).tree
        if (tree is None) != self._was_plain:  # the switch margin changed: choices made under it are stale
            self._was_plain = tree is None
            self._choice.clear()
        return tree

    def observe(
        self, rows: int, nodes: int, seconds: float, tokens: float | None = None, smaller: list | None = None
    ) -> None:
        """Feed back a measured step time, so that a calibration that is off (another process on the cores,
        a cache length unlike the calibration's) heals. Per (rows bucket, nodes), a moving average of
        log(measured / predicted) rescales that candidate's predicted cost: a tree slower than predicted
        loses to the next best, which is then measured in turn. A tree measured is costed by its own average; a
        size not measured yet by its measured neighbours', floored by plain decoding's (a slower machine slows
        every step, and sizes nobody measured must not look cheaper for it). One observation pulls the average by at
        most ALPHA * STEP (a 10x hiccup moves it 7%). Only the chosen candidate is measured, so the other trees'
        corrections relax toward the chosen tree's (RELAX: half-life ~200 tree steps of their bucket), and the
        rest toward none (FORGET: plain decoding's at tree steps, the trees' at plain steps; ~3,500): a tree
        judged slow by a passing load is tried again rather than left behind for good, while what every tree
        pays alike (the machine, the calibration's optimism) stays.

        `tokens`, the mean tokens each row committed in that step, feeds a second correction: `gain`, the
        moving average of observed / expected accepted drafts, scales every tree's expected gain over
        plain decoding (accuracies measured on other text than the one being decoded promise too much or
        too little for every tree alike). Plain steps relax it back toward the promise (GAIN_RELAX).

        `smaller`, for a step of a dynamic tree under greedy decoding: the drafts the dynamic tree of each size
        m = 2 .. `nodes` would have accepted at that step (entry m - 2; tree.smaller_trees_accepted), which
        corrects each size's tau where the accuracies misjudge one size against another (SHAPE_ALPHA)."""
        if seconds <= 0 or nodes not in self._index:
            return
        candidate = self.candidates[self._index[nodes]]
        if smaller is not None and candidate.tau > 1.0 and len(smaller) >= nodes - 1:
            reference = smaller[0]
            for c in self.candidates[1 : self._index[nodes] + 1]:
                entry = self._shape.setdefault(c.nodes, [0, 0.0, 0.0])
                entry[0] += 1
                alpha = max(self.SHAPE_ALPHA, 1.0 / entry[0])
                entry[1] += alpha * (smaller[c.nodes - 2] - entry[1])
                entry[2] += alpha * (reference - entry[2])
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
        # Plain steps measure the machine: a size not measured yet is costed at least at plain decoding's
        # correction (_rates), so a machine that slows down while decoding plainly does not make trees nobody
        # measured look cheaper. A measured tree is not floored: a machine can slow a one-token step more than a
        # tree's (memory contention), and floored, trees that paid 1.2x were costed at the one-token step's
        # slowdown and kept out for good. Corrections are absolute, not relative to plain decoding's: added to
        # it, a slowdown the trees measured first would count twice and keep them out for good.
        # A size measured for the first time starts from what it was costed at (interpolated), not from none.
        own = self._own(bucket, nodes) if nodes > 1 else self._log_ratio.get((bucket, 1), 0.0)
        own += self.ALPHA * min(max(sample - own, -self.STEP), self.STEP)
        self._log_ratio[(bucket, nodes)] = own
        for c in self.candidates:
            log_ratio = self._log_ratio.get((bucket, c.nodes))
            if c.nodes == nodes or not log_ratio:
                continue
            if nodes > 1 and c.nodes > 1:
                # Only a penalty fades: a tree measured cheaper than the one in use keeps that until it is chosen
                # and measured again (an optimistic correction corrects itself; a pessimistic one would not).
                if log_ratio > own:
                    self._log_ratio[(bucket, c.nodes)] = log_ratio + self.RELAX * (own - log_ratio)
            else:
                self._log_ratio[(bucket, c.nodes)] = log_ratio * (1.0 - self.FORGET)
        # Choose again every REVISIT observations, not after each: one step moves the averages a few percent
        # at most, and re-ranking every candidate costs ~2% of a 16-row step of the bundled model.
        self._observations += 1
        self._last_seen[(bucket, nodes)] = self._observations
        if self._observations % self.REVISIT == 0:
            self._rankings += 1
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
        """Per row count: the size chosen (never a deliberate try of a runner-up), its expected tau and
        predicted tokens/s, and plain decoding's."""
        out = []
        for rows in rows_list:
            choice, rates = self._rank(rows, self._was_plain, True, exploring=False), self._rates(rows)
            out.append({
                "rows": rows,
                "nodes": choice.nodes,
                "tau": choice.tau,
                "tokens_per_s": rates[self._index[choice.nodes]],
                "plain_tokens_per_s": rates[0],
            })
        return out
