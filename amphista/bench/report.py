"""What a benchmark leaves in RESULTS_DIR: Spec-Bench answer files, results.json, a Markdown table, plots.

answers/<method>.jsonl   one line per question, Spec-Bench's answer format (one choice per run)
results.json             every number, the settings and the environment
results.md               the tables
*.png                    speedup per category, accepted lengths, tree sweep (when run)
"""

from __future__ import annotations

import json
import os
import time


def answer_lines(records, questions, method: str, model_id: str) -> list[dict]:
    """Spec-Bench answer records for one method: choices[i] is run i, each field a list over turns."""
    lines = []
    for q in questions:
        mine = [r for r in records if r.method == method and r.question_id == q.question_id]
        choices = []
        for run in sorted({r.run for r in mine}):
            turns = sorted((r for r in mine if r.run == run), key=lambda r: r.turn)
            choices.append(
                {
                    "index": run,
                    "turns": [r.text for r in turns],
                    "new_tokens": [len(r.out.tokens) for r in turns],
                    "wall_time": [r.out.wall_time for r in turns],
                    "decoding_steps": [len(r.out.accept_lengths) for r in turns],
                    "accept_lengths": [list(r.out.accept_lengths) for r in turns],
                    "finish_reason": [r.out.finish_reason for r in turns],
                }
            )
        lines.append(
            {
                "question_id": q.question_id,
                "category": q.category,
                "answer_id": f"{model_id}-{q.question_id}",
                "model_id": model_id,
                "choices": choices,
                "tstamp": time.time(),
            }
        )
    return lines


def _num(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _pm(m: dict, key: str, fmt: str, suffix: str = "") -> str:
    std = m.get(key + "_std")
    if m.get(key) is None:
        return "n/a"
    return f"{m[key]:{fmt}}{suffix}" + (f" ± {std:{fmt}}" if std else "")


def _exact(m: dict) -> str:
    if m["exact_match"] is None:
        return "n/a (sampled)"
    if m["exact_mismatches"]:
        return f"**MISMATCH {m['exact_mismatches']}/{m['turns']}**"
    return f"{100 * m['exact_match']:.0f}%"


def methods_table(results: dict) -> str:
    rows = [
        "| method | tokens/s | speedup | tau | steps | step ms (mean / p50 / p90) | exact match |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = results["vanilla"]["baseline"]
    for name, m in results["methods"].items():
        label = f"{name} (baseline)" if name == base else name
        lat = " / ".join(_num(m.get(k), ".2f") for k in ("step_ms_mean", "step_ms_p50", "step_ms_p90"))
        rows.append(
            f"| {label} | {_pm(m, 'tokens_per_s', '.1f')} | {_pm(m, 'speedup', '.2f', 'x')} | "
            f"{_pm(m, 'tau', '.2f')} | {_num(m['steps'], '.0f')} | {lat} | {_exact(m)} |"
        )
    return "\n".join(rows)


CATEGORY_METRICS = {"speedup": (".2f", "x"), "tau": (".2f", ""), "tokens_per_s": (".1f", "")}


def category_table(results: dict, key: str = "speedup") -> str:
    """One row per method, one column per category (in question order) and overall, as in the papers'
    MT-Bench tables; `key`: "speedup", "tau" or "tokens_per_s"."""
    fmt, suffix = CATEGORY_METRICS[key]
    methods = results["methods"]
    cats = list(next(iter(methods.values()))["categories"])
    rows = ["| method | " + " | ".join(cats) + " | overall |", "|---|" + "---:|" * (len(cats) + 1)]
    for name, m in methods.items():
        cells = [m["categories"][c][key] for c in cats] + [m[key]]
        rows.append(
            f"| {name} | " + " | ".join("n/a" if v is None else f"{v:{fmt}}{suffix}" for v in cells) + " |"
        )
    return "\n".join(rows)


def breakdown_table(results: dict) -> str | None:
    """Mean ms per decode step: a speculative step split into its parts, next to vanilla's whole step
    (one target forward of one token, plus picking it)."""
    methods = results["methods"]
    if not any(m.get("step_breakdown") for m in methods.values()):
        return None
    rows = [
        "| method | step | draft | verification | = tree forward | + verify | + commit | tau | tree nodes: % of steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, m in methods.items():
        b = m.get("step_breakdown")
        if b:
            cells = [b[k] for k in ("step_ms", "draft_ms", "verification_ms", "tree_forward_ms", "verify_ms", "commit_ms")]
            rows.append(
                f"| {name} | " + " | ".join(f"{v:.2f}" for v in cells)
                + f" | {_num(m['tau'], '.2f')} | {_tree_shares(m.get('steps_by_tree_nodes'))} |"
            )
        elif m["kind"] == "vanilla" and m.get("step_ms_mean") is not None:
            rows.append(f"| {name} (one-token forward) | {m['step_ms_mean']:.2f} | | | | | | 1.00 | |")
    return "\n".join(rows)


def _tree_shares(steps: dict[str, int] | None) -> str:
    """"4: 70%, 6: 30%" from decode steps per tree size, the most used first; "1" reads "plain"."""
    total = sum(steps.values()) if steps else 0
    if not total:
        return ""
    used = sorted(steps.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{'plain' if n == '1' else n}: {100 * k / total:.0f}%" for n, k in used if k)


def sweep_table(results: dict) -> str:
    rows = ["| drafter | nodes | expected tau | tau | speedup | tokens/s |", "|---|---:|---:|---:|---:|---:|"]
    for name, entries in results["tree_sweep"].items():
        for e in entries:
            rows.append(
                f"| {name} | {e['num_nodes']} | {e['expected_tau']:.2f} | {_num(e['tau'], '.2f')} | "
                f"{_num(e['speedup'], '.2f')}x | {_num(e['tokens_per_s'], '.1f')} |"
            )
    return "\n".join(rows)


def markdown(results: dict) -> str:
    s, env = results["settings"], results["environment"]
    hw = env["gpu"] or f"{env['cpu']}, {env['torch_threads']} threads"
    van = results["vanilla"]
    mode = "greedy" if s["greedy"] else f"temperature {s['temperature']}"
    parts = [
        f"# Benchmark: {os.path.basename(env['target']['name_or_path'].rstrip('/')) or env['target']['architecture']}",
        "",
        f"{s['num_questions']} questions ({s['num_turns']} turns; {', '.join(s['categories'])}), "
        f"{mode}, max_new_tokens {s['max_new_tokens']}, "
        f"{s['runs']} run(s); {hw}; {env['dtype']}; torch {env['torch']}, transformers {env['transformers']}.",
        "",
        f"Vanilla = `{van['baseline']}`, the faster of the project's loop (`vanilla_loop`) and transformers "
        "`generate()` (`vanilla_hf`). tau = tokens per target forward, bonus token included (prefill counts "
        "as one step). Step latency: decode steps, prefill excluded. Mean ± std over runs.",
        "",
    ]
    for w in results["warnings"]:
        parts += [f"> **WARNING** {w}", ""]
    if not s["greedy"]:
        parts += [
            "Sampled: outputs are not compared with vanilla's (exact match n/a); losslessness under sampling "
            "is a property of the output distribution, not of single samples.",
            "",
        ]
    parts += [methods_table(results), ""]
    for key, title in (("speedup", "Speedup"), ("tau", "tau"), ("tokens_per_s", "Tokens/s")):
        parts += [f"## {title} by category", "", category_table(results, key), ""]
    breakdown = breakdown_table(results)
    if breakdown:
        parts += [
            "## Step breakdown (mean ms per decode step)",
            "",
            "draft: the drafter's heads and the top-k that builds the tree; verification: the target's tree "
            "forward, the acceptance test and the cache commit (with the stop check and bookkeeping).",
            "",
            breakdown,
            "",
        ]
    if results.get("tree_sweep"):
        parts += ["## Tree size sweep", "", sweep_table(results), ""]
    return "\n".join(parts)


def write_all(out, results, records, questions, methods, target, plots: bool = True) -> None:
    os.makedirs(os.path.join(out, "answers"), exist_ok=True)
    stem = os.path.basename((target.name_or_path or "target").rstrip("/")) or "target"
    for m in methods:
        with open(os.path.join(out, "answers", f"{m.name}.jsonl"), "w") as f:
            for line in answer_lines(records, questions, m.name, f"{stem}-{m.name}"):
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    results["files"] = {
        "answers": sorted(f"answers/{m.name}.jsonl" for m in methods),
        "table": "results.md",
        "plots": [],
    }
    if plots:
        from .plots import write_plots

        results["files"]["plots"] = write_plots(out, results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(results))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
        f.write("\n")
