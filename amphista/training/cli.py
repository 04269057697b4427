"""`amphista distill`, `amphista train` and `amphista heads-accuracy`."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from ..cli import HelpFormatter, add_placement, float_range, int_range, positive_int
from ..errors import InputError
from .config import DRAFTERS, TrainConfig, apply_overrides

non_negative_int = int_range(0, what="an integer, 0 or more")
positive_float = float_range(0.0, low_open=True)


TARGET_HELP = (
    "Hugging Face model folder, .gguf file or smollm2-135m-instruct (default: the bundled stories260K model)"
)


def add_parser(subparsers) -> None:
    fmt = HelpFormatter
    p = subparsers.add_parser(
        "distill", formatter_class=fmt,
        help="self-distillation: the target answers prompts, written as training JSONL",
        description="The target answers every prompt; its answers, one JSONL record each, become training data "
        "for `amphista train --data`.",
    )  # fmt: skip
    p.add_argument("--target", default=None, help=TARGET_HELP)
    p.add_argument("--prompts", required=True, help=".txt (one per line), or JSONL/JSON prompt records")
    p.add_argument("--out", required=True, help="output JSONL file (appended to; resumable)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="answers decoded at once")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="answer length limit per turn")
    p.add_argument("--temperature", type=float_range(0.0), default=0.7, help="0 for greedy")
    p.add_argument(
        "--top-p", type=float_range(0.0, 1.0, low_open=True), default=1.0, help="nucleus sampling mass"
    )
    p.add_argument("--num-samples", type=positive_int, default=1, help="answers per prompt")
    p.add_argument(
        "--mode",
        choices=("auto", "chat", "completion"),
        default="auto",
        help="auto: completion for a model without a chat template and one-turn prompts, else chat",
    )
    p.add_argument("--system", default=None, help="system prompt (chat mode)")
    p.add_argument(
        "--max-prompts", type=positive_int, default=None, help="use only the first N prompts (default: all)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_placement(p)
    p.set_defaults(func=run_distill)

    p = subparsers.add_parser(
        "train", formatter_class=fmt,
        help="train a drafter on a frozen target (works under accelerate launch)",
        description="Train a drafter on a frozen target. Flags left out take their value from --config when "
        "given, else the default shown (docs/training.md lists every TrainConfig field).",
    )  # fmt: skip
    p.add_argument("--target", default=None, help=TARGET_HELP)
    p.add_argument("--data", required=True, nargs="+", help="ShareGPT / messages / Alpaca / text files")
    p.add_argument("--drafter", choices=DRAFTERS, default="amphista", help="drafter kind")
    p.add_argument("--out", required=True, help="output folder (a loadable drafter)")
    p.add_argument("--eval-data", nargs="+", default=[], help="held-out files (default: split off 5%%)")
    p.add_argument(
        "--max-steps", type=positive_int, default=None, help="optimizer steps (default: --epochs decides)"
    )
    p.add_argument("--epochs", type=positive_float, default=None, help="passes over the data (default: 1.0)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="sequences per optimizer step, all processes (default: 8)",
    )
    p.add_argument(
        "--micro-batch-size",
        type=positive_int,
        default=None,
        help="per process and forward (default: --batch-size / processes)",
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="ResBlocks/heads (default: 3e-3 amphista, 1e-2 medusa, times sqrt(64 / the target's hidden size) "
        "when that is below 1)",
    )
    p.add_argument(
        "--lr-layers", type=positive_float, default=None, help="SAL/AEB transformer layers (default: --lr)"
    )
    p.add_argument(
        "--seq-len",
        type=int_range(3, what="an integer, at least 3"),
        default=None,
        help="tokens per training sequence (default: 512)",
    )
    p.add_argument(
        "--save-every",
        type=non_negative_int,
        default=None,
        help="checkpoint every N steps; 0: at the end only (default: 200)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        help="continue from the newest (or given) checkpoint, with the same settings",
    )
    p.add_argument("--init-drafter", default=None, help="start from this drafter folder")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument(
        "--feature-cache",
        metavar="DIR",
        default=None,
        help="where the target's hidden states are kept between epochs and runs (default: $AMPHISTA_CACHE/"
        "features, else ~/.cache/amphista/features)",
    )
    cache.add_argument(
        "--no-feature-cache",
        action="store_true",
        help="run the target on every batch instead (nothing written)",
    )
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields (flags and --set win)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any TrainConfig or drafter config field, e.g. --set num_heads=5 --set align_weight=0.5",
    )
    p.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    p.add_argument(
        "--seed", type=non_negative_int, default=None, help="data order and initialization (default: 0)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "heads-accuracy", formatter_class=fmt,
        help="per-head top-1..top-5 accuracy of a drafter on held-out data",
        description="Per-head top-1..top-5 accuracy of a drafter on held-out data, and the path frequencies "
        "`amphista tree` builds trees from.",
    )  # fmt: skip
    p.add_argument("--target", default=None, help=TARGET_HELP)
    p.add_argument("--drafter", required=True, help="drafter folder")
    p.add_argument("--data", required=True, nargs="+", help="held-out files, in the formats train reads")
    p.add_argument(
        "--max-examples", type=positive_int, default=256, help="evaluate at most this many examples"
    )
    p.add_argument(
        "--seq-len", type=int_range(3, what="an integer, at least 3"), default=512, help="tokens per sequence"
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward")
    p.add_argument("--json", default=None, help="also write the result here (head_accuracy.json format)")
    add_placement(p)
    p.set_defaults(func=run_heads_accuracy)


def target_path(arg: str | None) -> str:
    """--target, or the bundled model's folder when it is left out."""
    if arg:
        return arg
    from ..bundled import default_target_path

    return str(default_target_path())


def run_distill(args: argparse.Namespace) -> int:
    from .distillation import DistillConfig, distill

    cfg = DistillConfig(
        target=target_path(args.target), prompts=args.prompts, out=args.out, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        num_samples=args.num_samples, mode=args.mode, system=args.system, max_prompts=args.max_prompts,
        seed=args.seed, progress=not args.no_progress, device=args.device, dtype=args.dtype,
    )  # fmt: skip
    stats = distill(cfg)
    rate = stats["new_tokens"] / max(stats["seconds"], 1e-9)
    print(
        f"{stats['written']} records written to {args.out} ({stats['already_done']} were already there, "
        f"{stats['mode']} mode): {stats['new_tokens']} new tokens in {stats['seconds']:.1f} s ({rate:.0f} tokens/s)"
    )
    return 0


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    from .data import read_text

    cfg = TrainConfig()
    if args.config:
        try:
            data = json.loads(read_text(args.config, "--config file"))
        except json.JSONDecodeError as e:
            raise InputError(
                f"--config {args.config!r} is not valid JSON: line {e.lineno}, {e.msg}"
            ) from None
        if not isinstance(data, dict):
            raise InputError(
                f"--config {args.config!r} holds a {type(data).__name__}: write a JSON object of TrainConfig fields"
            )
        cfg = TrainConfig.from_json(data)
    cfg.target, cfg.data, cfg.drafter, cfg.out = (
        target_path(args.target),
        list(args.data),
        args.drafter,
        args.out,
    )
    flags = {
        "eval_data": args.eval_data or None, "max_steps": args.max_steps, "epochs": args.epochs,
        "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size, "lr": args.lr,
        "lr_layers": args.lr_layers, "seq_len": args.seq_len, "save_every": args.save_every,
        "init_drafter": args.init_drafter, "seed": args.seed,
    }  # fmt: skip
    for key, value in flags.items():
        if value is not None:
            setattr(cfg, key, value)
    if args.no_feature_cache:
        cfg.feature_cache = None
    elif args.feature_cache is not None:
        cfg.feature_cache = args.feature_cache
    cfg.resume = args.resume
    cfg.tensorboard = cfg.tensorboard or args.tensorboard
    cfg.progress = not args.no_progress
    return apply_overrides(cfg, args.overrides)


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run: the same flags, plus --resume."""
    words = ["amphista", "train"]
    if args.target:
        words += ["--target", args.target]
    words += ["--data", *args.data, "--out", args.out]
    if args.drafter != "amphista":
        words += ["--drafter", args.drafter]
    if args.eval_data:
        words += ["--eval-data", *args.eval_data]
    options = (
        ("max_steps", "--max-steps"), ("epochs", "--epochs"), ("batch_size", "--batch-size"),
        ("micro_batch_size", "--micro-batch-size"), ("lr", "--lr"), ("lr_layers", "--lr-layers"),
        ("seq_len", "--seq-len"), ("save_every", "--save-every"), ("init_drafter", "--init-drafter"),
        ("config", "--config"), ("seed", "--seed"),
    )  # fmt: skip
    for name, option in options:
        if getattr(args, name) is not None:
            words += [option, str(getattr(args, name))]
    for pair in args.overrides:
        words += ["--set", pair]
    if args.feature_cache is not None:
        words += ["--feature-cache", args.feature_cache]
    words += ["--no-feature-cache"] * args.no_feature_cache
    words += ["--tensorboard"] * args.tensorboard + ["--no-progress"] * args.no_progress
    return shlex.join([*words, "--resume"])


def interrupted_hint(args: argparse.Namespace) -> str:
    from .checkpoint import list_checkpoints

    found = list_checkpoints(args.out) if args.out else []
    if not found:
        return (
            "amphista train: interrupted before the first checkpoint (one is written every --save-every steps): "
            "nothing to resume, run the same command again"
        )
    launcher = (
        " (under the same launcher, e.g. accelerate launch)"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1
        else ""
    )
    return (
        f"amphista train: interrupted; the last checkpoint is {found[-1]}. Continue from it with{launcher}:\n"
        f"  {resume_command(args)}"
    )


def run_train(args: argparse.Namespace) -> int:
    from .trainer import train

    main = int(os.environ.get("RANK", "0")) == 0
    cfg = train_config_from_args(args)
    try:
        result = train(cfg)
    except KeyboardInterrupt:
        # Checkpoints are written atomically and none is written on Ctrl-C, so the newest complete one is
        # what a resume starts from; amphista's main() turns the interrupt into exit status 130.
        if main:
            print(f"\n{interrupted_hint(args)}", file=sys.stderr, flush=True)
        raise
    if main:
        print(
            f"drafter saved to {result.out} after {result.steps} steps ({result.tokens_per_s:.0f} tokens/s)"
        )
    return 0


def run_heads_accuracy(args: argparse.Namespace) -> int:
    from .. import drafters
    from ..target import TargetModel
    from .checkpoint import atomic_write_json
    from .data import check_output, load_examples
    from .evaluate import format_table, head_accuracy

    if args.json:
        check_output(args.json, "--json", folder=False, example="head_accuracy.json")
    target = TargetModel.load(target_path(args.target), dtype=args.dtype, device=args.device)
    drafter = drafters.load_drafter(args.drafter, target).to(target.device)
    examples, reports = load_examples(args.data, target.tokenizer, args.seq_len)
    for report in reports:
        print(report.summary())
    pad = target.tokenizer.pad_token_id
    pad = pad if pad is not None else (target.eos_token_ids() or [0])[0]
    result = head_accuracy(drafter, target, examples[: args.max_examples], args.batch_size, pad)
    print(format_table(result, title=f"{os.path.basename(os.path.normpath(args.drafter))} head accuracy"))
    if args.json:
        atomic_write_json(args.json, result)
    return 0
