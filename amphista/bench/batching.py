"""`amphista bench --batch-sizes 1,2,4,8,16`: aggregate throughput of batched decoding, method by method.

For every batch size B the same B prompts (first turns of the question set, in order) are decoded together
by: plain batched decoding (amphista's `VanillaDecoder.generate_batch` and transformers' left-padded
`generate`; the faster is the baseline), and every drafter with each fixed tree size and with tree="auto".
One run each, methods rotated per batch size. Each drafter's rows are also decoded one after another with
the same decoder (its single-sequence tokens/s), which is what batching is measured against.

Greedy rows must equal amphista's plain decoding of the same prompt; the report counts rows that do not.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from ..decoder import SpeculativeDecoder
from ..errors import InputError
from ..generation import sync
from ..threads import set_threads
from ..tree import build_tree
from ..vanilla import VanillaDecoder
from . import loading
from .environment import environment
from .questions import load_questions, turn_prompt

PLAIN, PLAIN_HF = "plain", "plain_hf"


@dataclass
class BatchBenchConfig:
    target: object = None  # None: the bundled model; a folder, .gguf file, known name or TargetModel
    drafters: dict | None = None  # name -> folder or Drafter; None: those shipped for the target
    questions: object = None  # as BenchConfig.questions; the first turns are the prompts
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    tree_sizes: list[int] = field(default_factory=lambda: [8])  # fixed trees, besides "auto"
    auto: bool = True
    max_new_tokens: int = 128
    hf_baseline: bool = True
    sequential: bool = True  # also time each drafter on the rows one after another
    runs: int = 1  # each measurement this many times, interleaved; the fastest counts
    threads: int | None = None
    drafter_dtype: str = "auto"  # see drafters.precision.for_drafting
    device: str | None = None
    dtype: str = "auto"
    progress: bool = True


@dataclass
class _Entry:
    name: str
    kind: str  # "plain" | "speculative"
    decoder: object  # a decoder, or the target for transformers' generate
    tree: str = ""  # "auto", "8 nodes", ... for the table


def _prompts(cfg: BatchBenchConfig, target, n: int) -> list[list[int]]:
    from .runner import BenchConfig, _questions_source

    source = _questions_source(BenchConfig(target=cfg.target, questions=cfg.questions))
    questions = load_questions(source, None, None, None)
    prompts = [turn_prompt(target.tokenizer, q.turns[:1], []) for q in questions]
    return [prompts[i % len(prompts)] for i in range(n)]


def _hf_batch(target, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """transformers' greedy generate on left-padded rows; each row's tokens up to its first EOS."""
    from transformers import GenerationConfig

    eos = target.eos_token_ids()
    pad = eos[0] if eos else 0
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=target.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=target.device)
    gen = GenerationConfig(
        max_new_tokens=max_new, do_sample=False, eos_token_id=eos or None, pad_token_id=pad
    )
    with torch.inference_mode():
        seq = target.model.generate(ids, attention_mask=mask, generation_config=gen)
    rows = []
    for row in seq[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def run_batch_benchmark(cfg: BatchBenchConfig) -> dict:
    """Decode batches of every size with every method; returns the results dict (see `batch_markdown`)."""
    from tqdm.auto import tqdm

    sizes = sorted(set(int(b) for b in cfg.batch_sizes))
    if not sizes or sizes[0] < 1:
        raise InputError(f"batch sizes must be positive integers, got {cfg.batch_sizes}")
    if any(int(n) < 2 for n in cfg.tree_sizes):
        raise InputError(f"tree sizes must be at least 2 nodes (root + 1), got {cfg.tree_sizes}")
    specs = (
        dict(cfg.drafters)
        if cfg.drafters is not None
        else dict(loading.bundled_drafters() if cfg.target is None else loading.shipped_drafters(cfg.target))
    )
    target = loading.load_target(cfg.target, cfg.device, cfg.dtype)
    set_threads(target, cfg.threads)  # None: the count measured fastest here
    prompts = _prompts(cfg, target, sizes[-1])
    entries = [_Entry(PLAIN, "plain", VanillaDecoder(target))]
    if cfg.hf_baseline:
        entries.append(_Entry(PLAIN_HF, "plain", target))
    for name, spec in specs.items():
        path = spec if isinstance(spec, (str, bytes)) or hasattr(spec, "__fspath__") else None
        drafter = loading.load_drafter_dir(name, spec, target, cfg.drafter_dtype) if path else spec
        accuracies = loading.accuracies_for(name, path, None, True) if path else None
        for n in cfg.tree_sizes:
            if accuracies is None:
                raise InputError(f"drafter {name!r}: fixed tree sizes need its head_accuracy.json")
            tree = build_tree(accuracies, int(n))
            entries.append(
                _Entry(f"{name}@{n}", "speculative", SpeculativeDecoder(target, drafter, tree), f"{n} nodes")
            )
        if cfg.auto:
            entries.append(
                _Entry(f"{name}@auto", "speculative", SpeculativeDecoder(target, drafter, "auto"), "auto")
            )

    kw = dict(max_new_tokens=cfg.max_new_tokens)
    for e in entries:  # warm-up: kernels, allocator, and tree="auto"'s calibration (cached per machine)
        if e.name == PLAIN_HF:
            _hf_batch(target, prompts[:2], 8)
        else:
            e.decoder.generate_batch(prompts[: min(2, sizes[-1])], max_new_tokens=8)
    reference: dict[int, list[int]] = {}
    rows = []
    bar = tqdm(total=len(sizes) * len(entries) * cfg.runs, desc="batch bench", disable=not cfg.progress, file=sys.stderr)
    for k, b in enumerate(sizes):
        batch = prompts[:b]
        found: dict[str, list[dict]] = {}
        # Runs interleave the methods (each run in another order) and the fastest run of each counts: on a
        # shared machine noise only ever slows a run down.
        for run in range(cfg.runs):
            shift = (k + run) % len(entries)
            order = entries[shift:] + entries[:shift]
            order.sort(key=lambda e: e.name != PLAIN)  # the reference goes first
            for e in order:
                bar.set_postfix_str(f"batch {b} {e.name}", refresh=False)
                sync(target.device)
                t0 = time.perf_counter()
                if e.name == PLAIN_HF:
                    tokens = _hf_batch(target, batch, cfg.max_new_tokens)
                    steps = None
                else:
                    outs = e.decoder.generate_batch(batch, **kw)
                    tokens = [o.new_tokens for o in outs]
                    steps = sum(o.steps - 1 for o in outs)  # row-steps after prefill
                sync(target.device)
                wall = time.perf_counter() - t0
                if e.name == PLAIN and run == 0:
                    for i, t in enumerate(tokens):
                        reference[i] = t
                new = sum(map(len, tokens))
                found.setdefault(e.name, []).append(
                    {
                        "batch": b,
                        "method": e.name,
                        "tree": e.tree,
                        "seconds": wall,
                        "new_tokens": new,
                        "tokens_per_s": new / wall,
                        "tau": (new - b) / steps if steps else (1.0 if steps is not None else None),
                        "mismatched_rows": sum(t != reference[i] for i, t in enumerate(tokens)),
                    }
                )
                bar.update(1)
        for e in entries:
            runs = found[e.name]
            fastest = min(runs, key=lambda r: r["seconds"])
            # Any run that differed from plain decoding is a failure, whichever run was fastest.
            fastest["mismatched_rows"] = max(r["mismatched_rows"] for r in runs)
            fastest["runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
            rows.append(fastest)
    bar.close()
    sequential = {}  # method -> tokens/s decoding every prompt one after another
    one_by_one: dict[str, list[list[float]]] = {}  # method -> per prompt [new tokens, fastest seconds]
    if cfg.sequential:
        for e in entries:
            if e.kind != "speculative" and e.name != PLAIN:
                continue
            timed = one_by_one[e.name] = [[0, float("inf")] for _ in prompts]
            for _ in range(cfg.runs):
                for i, p in enumerate(prompts):
                    sync(target.device)
                    t0 = time.perf_counter()
                    new = e.decoder.generate(p, **kw).num_new_tokens
                    sync(target.device)
                    timed[i] = min(timed[i], [new, time.perf_counter() - t0], key=lambda t: t[1])
            sequential[e.name] = sum(t[0] for t in timed) / sum(t[1] for t in timed)
    baseline: dict[int, dict] = {}  # batch size -> the faster plain decoding's row
    for r in rows:
        best = baseline.get(r["batch"])
        if r["method"] in (PLAIN, PLAIN_HF) and (best is None or r["tokens_per_s"] > best["tokens_per_s"]):
            baseline[r["batch"]] = r
    for r in rows:
        base = baseline[r["batch"]]
        r["vs_plain"] = r["tokens_per_s"] / base["tokens_per_s"]
        # Run i of every method of a batch size ran within seconds of run i of plain decoding: their ratio
        # leaves out the machine's drift between runs, which the ratio of the fastest runs does not.
        r["runs_vs_plain"] = [a / b for a, b in zip(r["runs_tokens_per_s"], base["runs_tokens_per_s"])]
        r["median_vs_plain"] = statistics.median(r["runs_vs_plain"])
        # Against the same decoder on the same prompts, one after another (each prompt's fastest run).
        timed = one_by_one.get(r["method"], [])[: r["batch"]]
        r["vs_sequential"] = (
            r["tokens_per_s"] * sum(t[1] for t in timed) / sum(t[0] for t in timed) if timed else None
        )
    return {
        "rows": rows,
        "sequential_tokens_per_s": sequential,
        "sequential_per_prompt": one_by_one,
        "settings": {
            "batch_sizes": sizes,
            "tree_sizes": list(cfg.tree_sizes),
            "auto": cfg.auto,
            "max_new_tokens": cfg.max_new_tokens,
            "runs": cfg.runs,
            "threads": torch.get_num_threads(),
            "prompts": len(prompts),
        },
        "environment": environment(target),
    }


def _table(title: str, sizes: list[int], columns: list[str], text) -> list[str]:
    """A markdown table under `title`: a row per batch size, a column per method, text(batch, method) in each."""
    lines = [title, "", "| batch | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    return lines + [f"| {b} | " + " | ".join(text(b, m) for m in columns) + " |" for b in sizes]


def batch_markdown(results: dict) -> str:
    """Tokens/s per batch size and method, with the ratio to the best plain decoding and tau; the ratios run by
    run; the rows at once against the same rows one after another."""
    sizes = results["settings"]["batch_sizes"]
    methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
    cell = {(r["batch"], r["method"]): r for r in results["rows"]}
    runs = results["settings"].get("runs", 1)

    def fastest(b, m):
        r = cell.get((b, m))
        if r is None:
            return ""
        text = f"{r['tokens_per_s']:.0f} ({r['vs_plain']:.2f}x"
        text += f", tau {r['tau']:.2f})" if r["tau"] and r["tau"] > 1.0 else ")"
        return text + (f" **{r['mismatched_rows']} rows differ**" if r["mismatched_rows"] else "")

    def run_by_run(b, m):
        r = cell.get((b, m))
        if r is None:
            return ""
        ratios = r["runs_vs_plain"]
        return f"{r['median_vs_plain']:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"

    lines = _table(
        "Aggregate tokens/s (ratio to the faster plain decoding; tau = tokens per row per target forward)"
        + (f"; the fastest of {runs} interleaved runs of each" if runs > 1 else ""),
        sizes,
        methods,
        fastest,
    )
    if runs > 1 and all("runs_vs_plain" in r for r in results["rows"]):
        lines += [""] + _table(
            "Run by run, against the faster plain decoding of the same run (seconds apart, so the machine's"
            " drift between runs drops out): median (lowest-highest) of the ratios",
            sizes,
            methods,
            run_by_run,
        )
    together = [m for m in methods if any((cell.get((b, m)) or {}).get("vs_sequential") for b in sizes)]
    if together:
        lines += [""] + _table(
            "The rows at once against the same rows one after another with the same decoder (each prompt's"
            " fastest run): ratio of tokens/s",
            sizes,
            together,
            lambda b, m: f"{(cell.get((b, m)) or {}).get('vs_sequential') or 0:.2f}x",
        )
    seq = results.get("sequential_tokens_per_s") or {}
    if seq:
        lines += [
            "",
            "One row after another with the same decoder (tokens/s): "
            + ", ".join(f"{m} {v:.0f}" for m, v in seq.items()),
        ]
    env = results["environment"]
    lines += [
        "",
        f"{env.get('cpu', env.get('device', ''))}; torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, {results['settings']['threads']} threads",
    ]
    return "\n".join(lines)


def batch_plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in dict.fromkeys(r["method"] for r in results["rows"]):
        pts = sorted((r["batch"], r["tokens_per_s"]) for r in results["rows"] if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (rows decoded together)")
    ax.set_ylabel("aggregate tokens/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_batch_results(cfg: BatchBenchConfig, out, plots: bool = True) -> tuple[dict, str]:
    """Run the batched benchmark and write batch_results.json, batch_results.md (and batching.png) to `out`."""
    import json
    from pathlib import Path

    from ..files import atomic_write_text

    results = run_batch_benchmark(cfg)
    text = batch_markdown(results)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "batch_results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(folder / "batch_results.md", text + "\n")
    if plots:
        batch_plot(results, folder / "batching.png")
    return results, text
