"""From per-turn records to the numbers in results.json: per method, per category and overall.

Each run is summarised on its own (tokens/s = new tokens / wall time over the scope, as Spec-Bench
does), then mean and standard deviation are taken over runs. Speedup is computed per run against the
vanilla baseline of the same run and scope, so drift between runs cancels.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

from .methods import LOOP, VANILLA, TurnOutput

WITH_STD = ("tokens_per_s", "speedup", "tau", "step_ms_mean", "wall_time")
# The parts of a speculative step, in the order TurnOutput.step_parts holds them.
STEP_PARTS = ("draft_ms", "tree_forward_ms", "verify_ms", "commit_ms")


@dataclass
class Record:
    run: int
    method: str
    question_id: int | str
    category: str
    turn: int
    prompt: list[int]
    out: TurnOutput
    text: str = ""


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_totals(recs: list[Record]) -> dict:
    """One run's numbers over a set of turns. Step latencies are decode steps only (prefill excluded)."""
    tokens = sum(len(r.out.tokens) for r in recs)
    wall = sum(r.out.wall_time for r in recs)
    steps = sum(len(r.out.accept_lengths) for r in recs)
    decode_ms = [1000 * t for r in recs for t in r.out.step_times[1:]]
    return {
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "tau": tokens / steps if steps else 0.0,
        "steps": steps,
        "new_tokens": tokens,
        "wall_time": wall,
        "step_ms_mean": statistics.fmean(decode_ms) if decode_ms else None,
        "step_ms_p50": percentile(decode_ms, 50),
        "step_ms_p90": percentile(decode_ms, 90),
    }


def step_breakdown(recs: list[Record]) -> dict | None:
    """Mean milliseconds per decode step in each part of a speculative step, over every profiled step of
    `recs`; "verification_ms" is tree forward + verify + commit, "step_ms" the whole step. None when no
    record was profiled (vanilla and custom methods)."""
    parts = [p for r in recs if r.out.step_parts for p in r.out.step_parts]
    if not parts:
        return None
    n = len(parts)
    out = {name: 1000 * sum(p[i] for p in parts) / n for i, name in enumerate(STEP_PARTS)}
    out["verification_ms"] = out["tree_forward_ms"] + out["verify_ms"] + out["commit_ms"]
    out["step_ms"] = out["draft_ms"] + out["verification_ms"]
    out["steps"] = n
    return out


def steps_by_tree_nodes(recs: list[Record]) -> dict[str, int] | None:
    """Decode steps per tree size verified ({"4": 812, "1": 40}: nodes, root included; "1" is plain decoding),
    smallest first: what tree="auto" chose. None for methods without a tree."""
    counts = Counter()
    for r in recs:
        counts.update(r.out.step_nodes or ())
    return {str(n): counts[n] for n in sorted(counts)} if counts else None


def _mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def exactness(recs: list[Record], reference: dict) -> tuple[float, list[dict]]:
    """Fraction of turns whose tokens equal the reference method's in the same run, and the mismatches."""
    mismatches = []
    for r in recs:
        ref = reference.get((r.run, r.question_id, r.turn))
        if ref is None or ref == r.out.tokens:
            continue
        pos = next(
            (i for i, (a, b) in enumerate(zip(r.out.tokens, ref)) if a != b), min(len(ref), len(r.out.tokens))
        )
        mismatches.append(
            {
                "run": r.run,
                "question_id": r.question_id,
                "turn": r.turn,
                "first_diff_at": pos,
                "new_tokens": len(r.out.tokens),
                "reference_new_tokens": len(ref),
            }
        )
    compared = sum((r.run, r.question_id, r.turn) in reference for r in recs)
    return (1.0 - len(mismatches) / compared if compared else 1.0), mismatches


def summarize(records: list[Record], methods: list[str], runs: int, greedy: bool = True) -> tuple[dict, dict]:
    """-> (methods: {name: metrics with "categories"}, vanilla: which vanilla each scope compares to).

    Categories keep the order in which the questions first bring them (MT-Bench's file order is the
    papers' table order). Sampled outputs are not compared with vanilla's: exact_match is None then."""
    categories = list(dict.fromkeys(r.category for r in records))
    by = {}
    for r in records:
        by.setdefault((r.method, r.category, r.run), []).append(r)
    reference = {(r.run, r.question_id, r.turn): r.out.tokens for r in records if r.method == LOOP}

    def totals(method, cats):
        return [run_totals([x for c in cats for x in by.get((method, c, run), [])]) for run in range(runs)]

    scopes = {None: categories, **{c: [c] for c in categories}}
    per_run = {(m, s): totals(m, cats) for m in methods for s, cats in scopes.items()}
    baseline = {}
    for s in scopes:
        present = [v for v in VANILLA if v in methods]
        baseline[s] = (
            max(present, key=lambda v: statistics.fmean(t["tokens_per_s"] for t in per_run[(v, s)]))
            if present
            else None
        )

    def block(m, s) -> dict:
        rows = per_run[(m, s)]
        base = per_run[(baseline[s], s)] if baseline[s] else None
        for i, row in enumerate(rows):
            b = base[i]["tokens_per_s"] if base else 0.0
            row["speedup"] = row["tokens_per_s"] / b if b > 0 else None
        out = {}
        for key in (
            "tokens_per_s",
            "speedup",
            "tau",
            "steps",
            "new_tokens",
            "wall_time",
            "step_ms_mean",
            "step_ms_p50",
            "step_ms_p90",
        ):
            mean, std = _mean_std([row[key] for row in rows])
            out[key] = mean
            if key in WITH_STD:
                out[key + "_std"] = std
        recs = [x for c in scopes[s] for run in range(runs) for x in by.get((m, c, run), [])]
        if greedy:
            out["exact_match"], mism = exactness(recs, reference)
            out["exact_mismatches"] = len(mism)
        else:  # sampling: the same seed does not make speculative and plain sampling draw the same tokens
            out["exact_match"], out["exact_mismatches"], mism = None, None, []
        out["turns"] = len(recs)
        if s is None:
            out["step_breakdown"] = step_breakdown(recs)
            out["steps_by_tree_nodes"] = steps_by_tree_nodes(recs)
            out["mismatch_examples"] = mism[:5]
            out["accept_length_hist"] = dict(
                sorted(
                    Counter(str(a) for x in recs for a in x.out.accept_lengths[1:]).items(),
                    key=lambda kv: int(kv[0]),
                )
            )
        return out

    result = {}
    for m in methods:
        result[m] = block(m, None)
        result[m]["categories"] = {c: block(m, c) for c in categories}
    vanilla = {
        "baseline": baseline[None],
        "by_category": {c: baseline[c] for c in categories},
        "reference_for_exactness": LOOP if LOOP in methods else None,
        **{f"{v}_tokens_per_s": result[v]["tokens_per_s"] for v in VANILLA if v in methods},
    }
    return result, vanilla
