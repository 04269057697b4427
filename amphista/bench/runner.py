"""`run_benchmark(BenchConfig(...))`: vanilla decoding and every drafter on the same prompts, in one process.

Order of work: check everything that can be checked from files (questions, categories, drafter folders,
trees, head accuracies), load the target and drafters (a drafter for another target fails here), check
that the prompts fit, warm every method up, then answer every question with every method, run after
run, rotating which method goes first so that machine noise falls on all of them alike.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from .. import cli
from ..bundled import FALLBACK_TREE
from ..decoder import SpeculativeDecoder
from ..errors import InputError
from ..threads import set_threads
from ..tree import TreeSpec, build_tree, expected_tau
from . import loading
from .environment import drafter_info, environment
from .methods import HF, LOOP, Method, Settings, vanilla_methods
from .questions import (
    answer_text,
    bundled_questions_path,
    default_questions_path,
    load_questions,
    questions_path,
    turn_prompt,
)
from .stats import Record, summarize

WARMUP_TOKENS = 32


@dataclass
class BenchConfig:
    target: object = None  # None: the bundled model; a folder; a TargetModel or transformers model
    drafters: dict | None = None  # name -> folder or Drafter; None: those shipped for the target, if any
    # JSONL file, bundled set name or list of dicts; None: the story openings (bundled target) or mt_bench
    questions: object = None
    categories: list[str] | str | None = None
    limit: int | None = None  # at most this many questions (after the category filter)
    per_category: int | None = None  # the first N questions of each category (a paper-style table, sooner)
    max_new_tokens: int = 256
    runs: int = 3
    warmup: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    # None: the default of every command -- "auto" for a drafter with head accuracies, else FALLBACK_TREE.
    tree: object = None  # a name, a JSON file, a path list, or "auto" (built from head accuracies)
    tree_nodes: int | None = None  # with tree "auto": a fixed tree of this size instead of the cost model
    # One method per drafter and tree size, built from head accuracies; "auto" among them: the cost model's.
    tree_sweep: list[int | str] | None = None
    # "default" (dynamic trees with "auto", the given shape otherwise, as generate and serve), "static",
    # "dynamic", or "both": every speculative method twice, named NAME:static and NAME:dynamic.
    tree_shape: str = "default"
    head_accuracies: dict = field(default_factory=dict)  # name -> file or list; default: head_accuracy.json
    hf_baseline: bool = True  # also time `transformers` generate() as a vanilla candidate
    extra_methods: dict = field(
        default_factory=dict
    )  # name -> object with .generate(ids, **kw) -> GenerateOutput
    device: str | None = None
    dtype: str = "auto"
    threads: int | None = None
    drafter_dtype: str = "auto"  # see drafters.precision.for_drafting
    # Time each speculative step's parts (draft, tree forward, verify, commit). None: on CPU only, where
    # it costs nothing; on a GPU each part needs a synchronisation that would slow the step it measures.
    step_breakdown: bool | None = None
    out: str | None = None  # results folder; None: nothing is written
    progress: bool = True
    plots: bool = True


# --tree-shape: the `dynamic` arguments of each speculative method's decoders (None: the decoder's default).
TREE_SHAPES = {**{name: (dynamic,) for name, dynamic in cli.TREE_SHAPES.items()}, "both": (False, True)}


def _check_settings(cfg: BenchConfig) -> None:
    if not isinstance(cfg.runs, int) or cfg.runs < 1:
        raise InputError(f"runs must be a positive integer, got {cfg.runs!r}")
    if not isinstance(cfg.max_new_tokens, int) or cfg.max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {cfg.max_new_tokens!r}")
    if cfg.temperature < 0:
        raise InputError(f"temperature must be >= 0, got {cfg.temperature}")
    if cfg.tree_sweep is not None and (
        not cfg.tree_sweep or any(n != "auto" and int(n) < 2 for n in cfg.tree_sweep)
    ):
        raise InputError(f"tree sizes must be 'auto' or at least 2 nodes (root + 1), got {cfg.tree_sweep}")
    if cfg.tree_shape not in TREE_SHAPES:
        raise InputError(f"tree_shape must be one of {', '.join(TREE_SHAPES)}, got {cfg.tree_shape!r}")
    clash = set(cfg.extra_methods) & {LOOP, "vanilla_hf"}
    if clash:
        raise InputError(f"{sorted(clash)} are the vanilla methods' names: name custom methods differently")


def _questions_source(cfg: BenchConfig):
    """The story openings suit the bundled model only; any other target gets MT-Bench by default."""
    if cfg.questions is not None:
        return cfg.questions
    return default_questions_path() if cfg.target is None else bundled_questions_path("mt_bench")


def _drafter_specs(cfg: BenchConfig) -> dict:
    if cfg.drafters is not None:
        return dict(cfg.drafters)
    if cfg.target is None:
        return dict(loading.bundled_drafters())
    return dict(loading.shipped_drafters(cfg.target))


def _is_path(spec) -> bool:
    return isinstance(spec, (str, os.PathLike))


def _tree_choice(cfg: BenchConfig, name: str, spec):
    """The tree a drafter runs with: cfg.tree, or by default a tree built from its head accuracies when
    it has them (generate and serve choose the same way) and FALLBACK_TREE when it does not."""
    if cfg.tree is not None:
        return cfg.tree
    has = name in cfg.head_accuracies or (_is_path(spec) and (Path(spec) / loading.ACCURACY_FILE).is_file())
    return "auto" if has else FALLBACK_TREE


def _needs_accuracies(cfg: BenchConfig, name: str, spec) -> bool:
    choice = _tree_choice(cfg, name, spec)
    return cfg.tree_sweep is not None or (isinstance(choice, str) and choice == "auto")


def prepare(cfg: BenchConfig):
    """Everything up to the first generation: -> (target, questions, methods, sweep plan)."""
    _check_settings(cfg)
    if cfg.out:
        from ..training.data import check_output

        check_output(cfg.out, "--out", folder=True)  # the results must not be lost after the whole run
    questions = load_questions(_questions_source(cfg), cfg.categories, cfg.limit, cfg.per_category)
    specs = _drafter_specs(cfg)
    shape = loading.target_shape(cfg.target) if any(map(_is_path, specs.values())) else None
    for name, spec in specs.items():
        if _is_path(spec):
            loading.check_drafter_dir(name, spec, shape)
    loading.check_tree(cfg.tree)
    accuracies = {}
    for name, spec in specs.items():
        if _needs_accuracies(cfg, name, spec):
            path = spec if _is_path(spec) else None
            accuracies[name] = loading.accuracies_for(name, path, cfg.head_accuracies.get(name), cfg.temperature == 0)

    target = loading.load_target(cfg.target, cfg.device, cfg.dtype)
    set_threads(target, cfg.threads)  # None: the count measured fastest here
    methods = vanilla_methods(target, cfg.hf_baseline)
    profile = target.device.type == "cpu" if cfg.step_breakdown is None else bool(cfg.step_breakdown)
    sweep = {}
    for name, spec in specs.items():
        path = spec if _is_path(spec) else None
        drafter = loading.load_drafter_dir(name, spec, target, cfg.drafter_dtype) if path else spec
        info = {"drafter": drafter_info(drafter, path)}
        # (name suffix, tree, its source, accuracies for "auto", sweep size): built once, run in each shape.
        if cfg.tree_sweep is not None:
            plans = [("@auto", "auto", "auto", accuracies[name], None) if n == "auto" else
                     (f"@{n}", build_tree(accuracies[name], int(n)), f"build_tree({n})", None, int(n))
                     for n in cfg.tree_sweep]  # fmt: skip
        else:
            choice = _tree_choice(cfg, name, spec)
            tree = loading.tree_for(choice, cfg.tree_nodes, accuracies.get(name))
            source = f"build_tree({cfg.tree_nodes})" if isinstance(tree, TreeSpec) and choice == "auto" else choice
            plans = [("", tree, source, accuracies.get(name), None)]
        for dynamic in TREE_SHAPES[cfg.tree_shape]:
            label = name if cfg.tree_shape != "both" else f"{name}:{'dynamic' if dynamic else 'static'}"
            for suffix, tree, source, acc, n in plans:
                method = _speculative(label + suffix, target, drafter, tree, info, source, profile, acc, dynamic)
                methods.append(method)
                if n is not None:
                    sweep.setdefault(label, []).append((method.name, n, expected_tau(tree, accuracies[name])))
    for name, obj in cfg.extra_methods.items():
        methods.append(Method(name, obj, "custom", {"class": type(obj).__name__}))
    for q in questions:  # later turns depend on the answers; the first ones can be checked now
        n = len(turn_prompt(target.tokenizer, q.turns, []))
        if target.max_context and n >= target.max_context:
            raise InputError(
                f"question {q.question_id!r}: the prompt has {n} tokens but the target's context window is "
                f"{target.max_context}: shorten it or leave it out with --categories"
            )
    return target, questions, methods, sweep


def _speculative(
    name, target, drafter, tree, info, source, profile: bool = False, accuracies=None, dynamic=None
) -> Method:
    # raises DrafterMismatchError / TreeError
    decoder = SpeculativeDecoder(target, drafter, tree=tree, accuracies=accuracies, dynamic=dynamic)
    decoder.profile_steps = profile
    spec = decoder.tree
    tree_info = {
        "source": source if isinstance(source, str) else "paths",
        "num_nodes": spec.num_nodes,
        "depth": spec.depth,
        # A dynamic tree has these many nodes at every step, shaped from that step's drafts; `paths` is
        # the static tree of the same size it starts from.
        "shape": "dynamic" if decoder.dynamic_trees else "static",
        "paths": spec.to_json(),
    }
    return Method(name, decoder, "speculative", {**info, "tree": tree_info})


def _settings(cfg: BenchConfig, run: int, qi: int, turn: int, max_new: int | None = None) -> Settings:
    # Sampling: the same seed for every method on the same turn of the same run.
    seed = cfg.seed + 1_000_003 * run + 1009 * qi + turn if cfg.temperature > 0 else None
    return Settings(max_new or cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, seed)


def _answer(method, target, q, qi, run, cfg) -> list[Record]:
    records, answers = [], []
    for t in range(len(q.turns)):
        prompt = turn_prompt(target.tokenizer, q.turns, answers)
        if target.max_context and len(prompt) >= target.max_context:
            raise InputError(
                f"question {q.question_id!r} turn {t + 1}: the conversation so far has {len(prompt)} tokens, "
                f"more than the context window ({target.max_context}): lower --max-new-tokens"
            )
        out = method.run(target, prompt, _settings(cfg, run, qi, t))
        text = answer_text(target.tokenizer, prompt, out.tokens)
        answers.append(text)
        records.append(Record(run, method.name, q.question_id, q.category, t, prompt, out, text))
    return records


def execute(cfg: BenchConfig, target, questions, methods) -> list[Record]:
    from tqdm.auto import tqdm

    first = turn_prompt(target.tokenizer, questions[0].turns, [])
    for _ in range(cfg.warmup):
        for m in methods:
            m.run(target, first, _settings(cfg, 0, 0, 0, min(cfg.max_new_tokens, WARMUP_TOKENS)))
    records: list[Record] = []
    bar = tqdm(
        total=cfg.runs * len(questions) * len(methods),
        desc="bench",
        unit="answer",
        disable=not cfg.progress,
        file=sys.stderr,
    )
    k = 0
    for run in range(cfg.runs):
        for qi, q in enumerate(questions):
            order = methods[k % len(methods) :] + methods[: k % len(methods)]
            k += 1
            for m in order:
                bar.set_postfix_str(f"run {run + 1}/{cfg.runs} {m.name}", refresh=False)
                records.extend(_answer(m, target, q, qi, run, cfg))
                bar.update(1)
    bar.close()
    return records


def run_benchmark(cfg: BenchConfig) -> dict:
    """Run the benchmark; returns the results.json dict (and writes RESULTS_DIR when cfg.out is set)."""
    return benchmark(cfg)[0]


def benchmark(cfg: BenchConfig) -> tuple[dict, list[Record]]:
    """`run_benchmark`, also returning every answered turn (tokens, text, timings)."""
    target, questions, methods, sweep = prepare(cfg)
    t0 = time.time()
    records = execute(cfg, target, questions, methods)
    names = [m.name for m in methods]
    summary, vanilla = summarize(records, names, cfg.runs, greedy=cfg.temperature == 0)
    for m in methods:
        summary[m.name] = {"kind": m.kind, **m.info, **summary[m.name]}
    results = {
        "methods": summary,
        "vanilla": vanilla,
        "settings": {
            **_settings_dict(cfg, questions),
            "step_breakdown": any(getattr(m.runner, "profile_steps", False) for m in methods),
        },
        "environment": environment(target),
        "elapsed_s": time.time() - t0,
        "warnings": _warnings(summary, cfg),
    }
    if sweep:
        results["tree_sweep"] = {
            name: [
                {
                    "nodes": n,
                    "num_nodes": summary[m]["tree"]["num_nodes"],
                    "expected_tau": exp,
                    **{k: summary[m][k] for k in ("tau", "speedup", "tokens_per_s", "exact_match")},
                }
                for m, n, exp in entries
            ]
            for name, entries in sweep.items()
        }
    for w in results["warnings"]:
        print(f"\n{'!' * 78}\n!! {w}\n{'!' * 78}", file=sys.stderr)
    if cfg.out:
        from .report import write_all

        write_all(cfg.out, results, records, questions, methods, target, plots=cfg.plots)
    return results, records


# Fields that may hold objects (a model, drafters, custom methods, question lists): recorded by what they name.
DESCRIBED = ("target", "drafters", "questions", "head_accuracies", "extra_methods", "tree")


def _plain(value):
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _settings_dict(cfg: BenchConfig, questions) -> dict:
    # Not asdict: it deep-copies every field, and a target or custom method passed as an object (weights
    # packed for the CPU among them) cannot be copied; the run would be lost after all of its answers. Every
    # other field is a plain value, recorded as given, so a new setting is on record without a list to extend.
    # A path (an `out` folder given as a Path) is recorded as its string: json cannot write it, and failing
    # there would lose the run.
    d = {f.name: _plain(getattr(cfg, f.name)) for f in fields(cfg) if f.name not in DESCRIBED}
    target = _plain(cfg.target)
    d["target"] = target if target is None or isinstance(target, str) else type(target).__name__
    d["drafters"] = None if cfg.drafters is None else list(cfg.drafters)
    d["head_accuracies"] = list(cfg.head_accuracies)
    d["extra_methods"] = list(cfg.extra_methods)
    d["tree"] = "default" if cfg.tree is None else cfg.tree if isinstance(cfg.tree, str) else "paths"
    source = _questions_source(cfg)
    d["questions"] = str(questions_path(source)) if _is_path(source) else "list"
    d["categories"] = list(dict.fromkeys(q.category for q in questions))
    d["num_questions"] = len(questions)
    d["num_turns"] = sum(len(q.turns) for q in questions)
    d["greedy"] = cfg.temperature == 0
    return d


def _warnings(summary: dict, cfg: BenchConfig) -> list[str]:
    if cfg.temperature > 0:
        return []  # sampled outputs are not expected to match token for token
    hf = summary.get(HF)
    # When transformers' own plain decoding disagrees with ours too, the cause is numerics, not drafting.
    numerics = (
        f" {HF} (plain decoding through transformers) differs as well, so these are near-tied argmaxes "
        "flipped by reduced precision rather than a speculative-decoding bug."
        if hf and hf["exact_mismatches"]
        else ""
    )
    out = []
    for name, m in summary.items():
        if m["exact_mismatches"]:
            ex = m["mismatch_examples"][0]
            out.append(
                f"GREEDY MISMATCH: {name} differs from {LOOP} on {m['exact_mismatches']} of {m['turns']} "
                f"turns (first: question {ex['question_id']!r}, turn {ex['turn'] + 1}, run {ex['run'] + 1}, "
                f"token {ex['first_diff_at']}). At temperature 0 the output must be identical: in float32 this is "
                "a bug; in bfloat16/float16, batched tree forwards can flip near-tied argmaxes." + numerics
            )
    return out
