"""`amphista demo`: the bundled model decoded three ways -- vanilla, Medusa, Amphista -- side by side.

A small benchmark (amphista.bench) on a few of the shipped story openings: tokens/s, speedup over
vanilla, tau, and whether each output equals vanilla's token for token; then one generated story.
"""

from __future__ import annotations

import json
import sys

from .cli import HelpFormatter, int_range, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="bundled model: vanilla vs Medusa vs Amphista, side by side",
        description="Decode a few story openings with the bundled stories260K model and its bundled drafters, "
        "and compare speed and output with plain decoding.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--prompts", type=positive_int, default=6, help="story openings to decode (one per category first)"
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="most tokens per opening")
    p.add_argument(
        "--runs", type=positive_int, default=3, help="repeat everything this many times (mean ± std)"
    )
    # At this model's size a forward costs ~1 ms and verifying 16 tokens costs half as much again, so small
    # trees built from each drafter's head accuracies win: in two `amphista bench --tree-sweep` runs of the
    # shipped drafters, 8 nodes were the fastest size or within 1% of it for both drafters (against 10 and 12;
    # 16 was slower before), and the 64-node mc_sim_7b_63 is slower than vanilla here.
    p.add_argument(
        "--tree", default="auto", help="'auto' (built from head accuracies), a tree name or JSON file"
    )
    p.add_argument(
        "--tree-nodes",
        type=int_range(2, what="an integer of at least 2"),
        default=8,
        help="size of 'auto' trees",
    )
    p.add_argument(
        "--drafter", action="append", metavar="NAME=DIR", help="other drafters (default: the bundled)"
    )
    # A 64-wide model's ops are too small to split: on 2 cores every method ran 10-20% slower with 2 threads.
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the results as JSON (results.json schema)")
    p.set_defaults(func=run_demo)


def demo_questions(n: int):
    """The first single-turn opening of each category, then the next ones, so a few prompts stay varied."""
    from .bench import load_questions

    pool = [q for q in load_questions() if len(q.turns) == 1]
    by_cat: dict[str, list] = {}
    for q in pool:
        by_cat.setdefault(q.category, []).append(q)
    picked = []
    while len(picked) < min(n, len(pool)):
        for qs in by_cat.values():
            if qs and len(picked) < n:
                picked.append(qs.pop(0))
    return picked


def run_demo(args) -> int:
    from .bench import BenchConfig, benchmark
    from .bench.loading import parse_drafter_args
    from .bench.methods import LOOP
    from .bench.report import methods_table

    cfg = BenchConfig(
        drafters=parse_drafter_args(args.drafter) if args.drafter else None,
        questions=demo_questions(args.prompts),
        max_new_tokens=args.max_new_tokens,
        runs=args.runs,
        tree=args.tree,
        tree_nodes=args.tree_nodes,
        threads=args.threads,
        progress=not args.json,
        plots=False,
    )
    results, records = benchmark(cfg)
    story = _story(results, records, cfg.questions)
    if args.json:
        print(json.dumps({**results, "story": story}, indent=2, ensure_ascii=False))
        return 1 if results["warnings"] else 0
    env = results["environment"]
    print(
        f"\nstories260K on {env['gpu'] or env['cpu']} ({env['torch_threads']} thread{'s' if env['torch_threads'] != 1 else ''}), {len(cfg.questions)} story "
        f"openings, {args.max_new_tokens} new tokens max, greedy, {args.runs} run(s):\n"
    )
    trees = ", ".join(
        f"{n}: {m['tree']['num_nodes']}" for n, m in results["methods"].items() if m.get("tree")
    )
    print(methods_table(results))
    print(f"\ntree nodes per step (root included): {trees}")
    print(
        f"\nspeedup: tokens/s over vanilla ({results['vanilla']['baseline']}, the faster of amphista's loop "
        "and transformers generate()); tau: tokens per target forward, bonus included; exact match: "
        f"output equal to {LOOP}'s, token for token."
    )
    print(f"\n--- {story['method']}, prompt {story['question_id']} ---\n{story['prompt']}{story['text']}")
    print(
        f"--- {story['new_tokens']} tokens in {story['steps']} target forwards; identical to vanilla: "
        f"{story['equals_vanilla']} ---"
    )
    if results["warnings"]:
        print("\n" + "\n".join(results["warnings"]), file=sys.stderr)
        return 1
    return 0


def _story(results: dict, records, questions) -> dict:
    """The first prompt as decoded by the last speculative method (Amphista when bundled), first run."""
    spec = [n for n, m in results["methods"].items() if m["kind"] == "speculative"]
    method = spec[-1] if spec else next(iter(results["methods"]))
    first = records[0].question_id
    mine = next(
        r for r in records if r.method == method and r.question_id == first and r.run == 0 and r.turn == 0
    )
    ref = next(
        (
            r
            for r in records
            if r.method == "vanilla_loop" and r.question_id == first and r.run == 0 and r.turn == 0
        ),
        None,
    )
    return {
        "method": method,
        "question_id": first,
        "prompt": next(q.turns[0] for q in questions if q.question_id == first),
        "text": mine.text,
        "new_tokens": len(mine.out.tokens),
        "steps": len(mine.out.accept_lengths),
        "equals_vanilla": ref is not None and ref.out.tokens == mine.out.tokens,
    }
