"""`amphista demo`: a target decoded three ways -- vanilla, Medusa, Amphista -- side by side.

A small benchmark (amphista.bench) on a few prompts: tokens/s, speedup over vanilla, tau, and whether each
output equals vanilla's token for token; then one generated answer. The bundled stories260K model gets
story openings; another target (`--target smollm2-135m-instruct`) gets MT-Bench first turns through its
chat template, with the drafters shipped for it.
"""

from __future__ import annotations

import json
import sys

from .cli import HelpFormatter, add_placement, int_range, positive_int

# (prompts, max new tokens, runs): the bundled model decodes ~1000 tokens/s; a 135M chat model ~20, so
# there the demo answers fewer, shorter prompts once to finish in about a minute.
BUNDLED_SIZE = (6, 128, 3)
CHAT_SIZE = (4, 64, 1)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="vanilla vs Medusa vs Amphista, side by side (bundled model, or --target)",
        description="Decode a few prompts with a target and its shipped drafters (default: the bundled "
        "stories260K model on story openings; --target smollm2-135m-instruct: MT-Bench first turns through its "
        "chat template) and compare speed and output with plain decoding.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--target",
        help="a model name (smollm2-135m-instruct), folder or .gguf file (default: the bundled stories260K)",
    )
    p.add_argument(
        "--prompts",
        type=positive_int,
        help=f"prompts to decode, one per category first; {CHAT_SIZE[0]} with --target (default: {BUNDLED_SIZE[0]})",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        help=f"most tokens per prompt; {CHAT_SIZE[1]} with --target (default: {BUNDLED_SIZE[1]})",
    )
    p.add_argument(
        "--runs",
        type=positive_int,
        help=f"repeat everything this many times (mean ± std); {CHAT_SIZE[2]} with --target "
        f"(default: {BUNDLED_SIZE[2]})",
    )
    # The same default tree as every other command (amphista.bundled.DEFAULT_TREE).
    p.add_argument(
        "--tree",
        default=None,
        help="token tree: 'auto' (the default where the drafter has head_accuracy.json): at each step the tree, or "
        "none, with the most expected tokens/s for the live rows, from the head accuracies and this machine's measured "
        "step costs (docs/cost-model.md); else a name (mc_sim_7b_63, chain) or a JSON file",
    )
    p.add_argument(
        "--tree-nodes",
        type=int_range(2, what="an integer of at least 2"),
        metavar="N",
        help="with --tree auto: verify the best N-token tree (root included) for the head accuracies at every step, "
        "instead of the cost model's choice",
    )
    p.add_argument(
        "--drafter",
        action="append",
        metavar="NAME=DIR",
        help="other drafters (default: those shipped for the target)",
    )
    # A 64-wide model's ops are too small to split: on 2 cores every method ran 10-20% slower with 2 threads.
    p.add_argument(
        "--threads",
        type=positive_int,
        help="torch CPU threads (default: the count measured fastest for the target here, as in generate)",
    )
    add_placement(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON (results.json schema)")
    p.set_defaults(func=run_demo)


def demo_questions(n: int, chat: bool = False):
    """A few varied single-turn prompts, one per category first: story openings for the bundled model,
    MT-Bench first turns (`chat`) for a chat model."""
    from .bench import load_questions
    from .bench.questions import Question

    if chat:
        pool = [Question(q.question_id, q.category, q.turns[:1]) for q in load_questions("mt_bench")]
    else:
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
    from .bench.loading import drafter_note, parse_drafter_args, shipped_drafters
    from .bench.methods import LOOP
    from .bench.report import breakdown_table, methods_table
    from .errors import CheckpointError

    chat = args.target is not None
    sizes = CHAT_SIZE if chat else BUNDLED_SIZE
    n_prompts, max_new, runs = (
        given if given is not None else default
        for given, default in zip((args.prompts, args.max_new_tokens, args.runs), sizes)
    )
    drafters = parse_drafter_args(args.drafter, args.target) if args.drafter else None
    if chat and drafters is None:
        drafters = shipped_drafters(args.target)
        if not drafters:
            raise CheckpointError(drafter_note(args.target, "a side-by-side needs at least one drafter"))
        print(f"amphista demo: {drafter_note(args.target)}", file=sys.stderr)
    cfg = BenchConfig(
        target=args.target,
        drafters=drafters,
        questions=demo_questions(n_prompts, chat),
        max_new_tokens=max_new,
        runs=runs,
        tree=args.tree,
        tree_nodes=args.tree_nodes,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        progress=not args.json,
        plots=False,
    )
    results, records = benchmark(cfg)
    story = _story(results, records, cfg.questions)
    if args.json:
        print(json.dumps({**results, "story": story}, indent=2, ensure_ascii=False))
        return 1 if results["warnings"] else 0
    env = results["environment"]
    name = args.target or "stories260K"
    threads = f"{env['torch_threads']} thread{'s' if env['torch_threads'] != 1 else ''}"
    what = "MT-Bench first turns" if chat else "story openings"
    print(
        f"\n{name} on {env['gpu'] or env['cpu']} ({threads}), {len(cfg.questions)} {what}, "
        f"{max_new} new tokens max, greedy, {runs} run(s):\n"
    )
    trees = ", ".join(
        f"{n}: {m['tree']['num_nodes']}" + (" (auto)" if m["tree"]["source"] == "auto" else "")
        for n, m in results["methods"].items()
        if m.get("tree")
    )
    print(methods_table(results))
    print(f"\ntree nodes per step (root included): {trees}")
    breakdown = breakdown_table(results)
    if breakdown:
        print("\nmean ms per decode step (verification = tree forward + verify + commit):\n" + breakdown)
    print(
        f"\nspeedup: tokens/s over vanilla ({results['vanilla']['baseline']}, the faster of amphista's loop "
        "and transformers generate()); tau: tokens per target forward, bonus included; exact match: "
        f"output equal to {LOOP}'s, token for token."
    )
    if chat:
        body = f"User: {story['prompt']}\nAssistant: {story['text']}"
    else:
        body = story["prompt"] + story["text"]
    print(f"\n--- {story['method']}, prompt {story['question_id']} ---\n{body}")
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
