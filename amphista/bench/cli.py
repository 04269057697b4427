"""`amphista bench` (speed benchmark) and `amphista tree` (a tree from measured head accuracies)."""

from __future__ import annotations

import json
import sys

from ..bundled import FALLBACK_TREE
from ..cli import (
    HelpFormatter,
    add_drafter_dtype,
    add_placement,
    add_tree_shape,
    float_range,
    int_range,
    positive_int,
)
from ..errors import InputError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        formatter_class=HelpFormatter,
        help="speed benchmark: vanilla vs each drafter on a question set (Spec-Bench style)",
        description="Vanilla decoding (the faster of amphista's loop and transformers generate()) and every "
        "drafter, on the same prompts in one process; tokens/s, speedup, tau, step latency, greedy exactness.",
    )
    p.add_argument(
        "--target",
        help="Hugging Face model folder, .gguf file or smollm2-135m-instruct (default: the bundled stories260K)",
    )
    p.add_argument(
        "--drafter",
        action="append",
        metavar="NAME=DIR",
        help="a drafter folder, repeatable; DIR 'medusa' or 'amphista': the one shipped for the target (default: the "
        "medusa and amphista drafters shipped for the target, when there are any)",
    )
    p.add_argument(
        "--questions",
        help="MT-Bench/Spec-Bench JSONL file, or a bundled set: mt_bench, stories (default: stories with the "
        "bundled model, mt_bench with --target)",
    )
    p.add_argument("--categories", help="comma-separated categories to keep (default: all)")
    p.add_argument("--limit", type=positive_int, help="at most this many questions (default: all)")
    p.add_argument(
        "--per-category",
        type=positive_int,
        metavar="N",
        help="the first N questions of each category (default: all)",
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="answer length limit per turn")
    p.add_argument(
        "--runs", type=positive_int, default=3, help="repeat everything this many times (mean ± std)"
    )
    p.add_argument(
        "--warmup",
        type=int_range(0, what="an integer, 0 or more"),
        default=1,
        help="warm-up passes per method before timing",
    )
    p.add_argument(
        "--temperature", type=float_range(0.0), default=0.0, help="0: greedy, where every method must agree"
    )
    p.add_argument(
        "--top-p", type=float_range(0.0, 1.0, low_open=True), default=1.0, help="nucleus sampling mass"
    )
    p.add_argument(
        "--top-k",
        type=int_range(0, what="an integer, 0 or more"),
        default=0,
        help="sample from the k likeliest tokens; 0: all",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--tree",
        default=None,
        help="tree name (mc_sim_7b_63, chain), JSON file, or 'auto' (the cost model's choice from each drafter's "
        f"head_accuracy.json and this machine's step costs; the default where it exists, else {FALLBACK_TREE}, "
        "as in generate and serve)",
    )
    p.add_argument(
        "--tree-nodes",
        type=int_range(2, what="an integer, at least 2"),
        metavar="N",
        help="with --tree auto: verify the best N-token tree (root included) for the head accuracies at every step, "
        "instead of the cost model's choice",
    )
    p.add_argument(
        "--tree-sweep",
        metavar="N,N,...",
        help="benchmark each drafter at these tree sizes; 'auto' among them adds the cost model's choice, "
        "side by side in the same run (e.g. auto,4,8)",
    )
    add_tree_shape(p, both=True)
    p.add_argument(
        "--batch-sizes",
        metavar="B,B,...",
        help="batched decoding instead: at each batch size, that many first turns decoded together by plain "
        "decoding (amphista's and transformers' left-padded generate) and each drafter with tree 'auto' and "
        "the --tree-sweep sizes (default 8); aggregate tokens/s, tau, exactness per row; each measured --runs times, "
        "interleaved, the fastest counting",
    )
    p.add_argument(
        "--head-accuracy",
        action="append",
        metavar="NAME=FILE",
        help="head accuracies for a drafter (default: head_accuracy.json in its folder)",
    )
    p.add_argument("--no-hf-baseline", action="store_true", help="skip transformers generate() as a baseline")
    add_placement(p)
    p.add_argument(
        "--threads",
        type=positive_int,
        help="torch CPU threads (default: the count measured fastest for the target here, as in generate)",
    )
    add_drafter_dtype(p)
    p.add_argument(
        "--out", required=True, metavar="RESULTS_DIR", help="folder for answers, results.json, plots"
    )
    p.add_argument("--no-plots", action="store_true", help="no PNG plots (they need matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_bench)

    t = sub.add_parser(
        "tree",
        formatter_class=HelpFormatter,
        help="build the best token tree for a drafter from its head accuracies",
        description="Medusa-style tree of N tokens (root included) with the highest expected "
        "accepted length, from per-head top-k accuracies.",
    )
    t.add_argument(
        "--accuracies", required=True, metavar="FILE", help='JSON {"top_k": [[top1, ...] per head]}'
    )
    t.add_argument("--nodes", type=int, required=True, help="tokens verified per step, root included")
    t.add_argument("--out", metavar="FILE", help="write the tree as JSON (loadable by --tree FILE)")
    t.add_argument(
        "--greedy",
        action="store_true",
        help="use the accuracies against the target's argmax (top_k_target), as greedy benchmarks do",
    )
    t.set_defaults(func=run_tree)


def _pairs(values, flag: str) -> dict[str, str]:
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise InputError(f"{flag} {v!r}: expected NAME=FILE")
        out[name] = path
    return out


def _sizes(text: str | None, flag: str = "--tree-sweep") -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise InputError(f"{flag} {text!r}: expected comma-separated integers like 1,2,4,8") from e


def _sweep(text: str | None) -> list[int | str] | None:
    """--tree-sweep: sizes, and "auto" where it is listed (kept in its place)."""
    if text is None:
        return None
    try:
        return [x if x == "auto" else int(x) for x in (x.strip() for x in text.split(",")) if x]
    except ValueError as e:
        raise InputError(f"--tree-sweep {text!r}: expected comma-separated sizes like 4,8,16, and 'auto'") from e


def config_from_args(args):
    from . import loading
    from .runner import BenchConfig

    drafters = loading.parse_drafter_args(args.drafter, args.target) if args.drafter else None
    return BenchConfig(
        target=args.target,
        drafters=drafters,
        questions=args.questions,
        categories=args.categories,
        limit=args.limit,
        per_category=args.per_category,
        max_new_tokens=args.max_new_tokens,
        runs=args.runs,
        warmup=args.warmup,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        tree=args.tree,
        tree_nodes=args.tree_nodes,
        tree_sweep=_sweep(args.tree_sweep),
        tree_shape=args.tree_shape,
        head_accuracies=_pairs(args.head_accuracy, "--head-accuracy"),
        hf_baseline=not args.no_hf_baseline,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        drafter_dtype=args.drafter_dtype,
        out=args.out,
        progress=not args.quiet,
        plots=not args.no_plots,
    )


def run_bench(args) -> int:
    from .loading import drafter_note
    from .report import markdown
    from .runner import run_benchmark

    if args.batch_sizes:
        return run_batch_bench(args)
    cfg = config_from_args(args)
    if cfg.target is not None and cfg.drafters is None:
        print(f"amphista bench: {drafter_note(cfg.target)}", file=sys.stderr)
    results = run_benchmark(cfg)
    print(markdown(results))
    print(f"\nwritten to {args.out}/ (results.json, results.md, answers/, plots)")
    # A greedy mismatch is a correctness failure, not a number: scripts and CI must notice it.
    return 1 if results["warnings"] else 0


def run_batch_bench(args) -> int:
    from ..training.data import check_output
    from . import loading
    from .batching import BatchBenchConfig, write_batch_results

    sizes = _sizes(args.batch_sizes, "--batch-sizes")
    if any(b < 1 for b in sizes):
        raise InputError(f"--batch-sizes {args.batch_sizes!r}: batch sizes must be positive")
    check_output(args.out, "--out", folder=True)
    if args.target is not None and not args.drafter:
        print(f"amphista bench: {loading.drafter_note(args.target)}", file=sys.stderr)
    cfg = BatchBenchConfig(
        target=args.target,
        drafters=loading.parse_drafter_args(args.drafter, args.target) if args.drafter else None,
        questions=args.questions,
        batch_sizes=sizes,
        # Batches always run "auto" beside the fixed sizes.
        tree_sizes=[n for n in _sweep(args.tree_sweep) if n != "auto"] or [8] if args.tree_sweep else [8],
        max_new_tokens=args.max_new_tokens,
        hf_baseline=not args.no_hf_baseline,
        runs=args.runs,
        threads=args.threads,
        drafter_dtype=args.drafter_dtype,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet,
    )
    results, text = write_batch_results(cfg, args.out, plots=not args.no_plots)
    print(text)
    print(
        f"\nwritten to {args.out}/ (batch_results.json, batch_results.md"
        + (", batching.png)" if not args.no_plots else ")")
    )
    return 1 if any(r["mismatched_rows"] for r in results["rows"]) else 0


def run_tree(args) -> int:
    from ..tree import build_tree, expected_tau, load_accuracies

    if args.out:
        from ..training.data import check_output

        check_output(args.out, "--out", folder=False, example="tree.json")
    acc = load_accuracies(args.accuracies, args.greedy)
    tree = build_tree(acc, args.nodes)
    tau = expected_tau(tree, acc)
    basis = "measured path frequencies" if acc.paths else "independent heads"
    print(
        f"tree: {tree.num_nodes} nodes (root included), depth {tree.depth}, expected tau {tau:.3f} "
        f"({basis}, bonus included)"
    )
    for depth in range(1, tree.depth + 1):
        paths = [list(p) for p in tree.paths if len(p) == depth]
        print(f"  depth {depth} ({len(paths)}): {json.dumps(paths)}")
    if args.out:
        data = {
            "paths": tree.to_json(),
            "num_nodes": tree.num_nodes,
            "depth": tree.depth,
            "expected_tau": tau,
            "accuracies": args.accuracies,
        }
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        print(f"written to {args.out} (use it with --tree {args.out})")
    return 0
