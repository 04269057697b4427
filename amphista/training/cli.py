"""`amphista distill`, `amphista train` and `amphista heads-accuracy`."""

from __future__ import annotations

import argparse
import json
import os

from .config import DRAFTERS, TrainConfig, apply_overrides


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "distill", help="self-distillation: the target answers prompts, written as training JSONL"
    )
    p.add_argument("--target", required=True, help="local Hugging Face model folder")
    p.add_argument("--prompts", required=True, help=".txt (one per line), or JSONL/JSON prompt records")
    p.add_argument("--out", required=True, help="output JSONL (appended to; resumable)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1, help="answers per prompt")
    p.add_argument("--mode", choices=("auto", "chat", "completion"), default="auto")
    p.add_argument("--system", default=None, help="system prompt (chat mode)")
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_distill)

    p = subparsers.add_parser("train", help="train a drafter on a frozen target (works under accelerate launch)")
    p.add_argument("--target", required=True, help="local Hugging Face model folder")
    p.add_argument("--data", required=True, nargs="+", help="ShareGPT / messages / Alpaca / text files")
    p.add_argument("--drafter", choices=DRAFTERS, default="amphista")
    p.add_argument("--out", required=True, help="output folder (a loadable drafter)")
    p.add_argument("--eval-data", nargs="+", default=[], help="held-out files (default: split off 5%%)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="sequences per optimizer step, all processes")
    p.add_argument("--micro-batch-size", type=int, default=None, help="per process and forward")
    p.add_argument("--lr", type=float, default=None, help="ResBlocks/heads (default: 3e-3 amphista, 1e-2 medusa)")
    p.add_argument("--lr-layers", type=float, default=None, help="SAL/AEB transformer layers (default: --lr)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--resume", nargs="?", const=True, default=False, help="continue from the newest (or given) checkpoint")
    p.add_argument("--init-drafter", default=None, help="start from this drafter folder")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields (flags and --set win)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any TrainConfig or drafter config field, e.g. --set num_heads=5 --set align_weight=0.5")
    p.add_argument("--tensorboard", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)

    p = subparsers.add_parser("heads-accuracy", help="per-head top-1..top-5 accuracy of a drafter on held-out data")
    p.add_argument("--target", required=True)
    p.add_argument("--drafter", required=True, help="drafter folder")
    p.add_argument("--data", required=True, nargs="+")
    p.add_argument("--max-examples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=None, help="also write the result here (head_accuracy.json format)")
    p.set_defaults(func=run_heads_accuracy)


def run_distill(args: argparse.Namespace) -> int:
    from .distillation import DistillConfig, distill

    cfg = DistillConfig(
        target=args.target, prompts=args.prompts, out=args.out, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        num_samples=args.num_samples, mode=args.mode, system=args.system, max_prompts=args.max_prompts,
        seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    stats = distill(cfg)
    print(f"{stats['written']} records written to {args.out} ({stats['already_done']} were already there, {stats['mode']} mode)")
    return 0


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig()
    if args.config:
        with open(args.config) as f:
            cfg = TrainConfig.from_json(json.load(f))
    cfg.target, cfg.data, cfg.drafter, cfg.out = args.target, list(args.data), args.drafter, args.out
    flags = {
        "eval_data": args.eval_data or None, "max_steps": args.max_steps, "epochs": args.epochs,
        "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size, "lr": args.lr,
        "lr_layers": args.lr_layers, "seq_len": args.seq_len, "save_every": args.save_every,
        "init_drafter": args.init_drafter, "seed": args.seed,
    }  # fmt: skip
    for key, value in flags.items():
        if value is not None:
            setattr(cfg, key, value)
    cfg.resume = args.resume
    cfg.tensorboard = cfg.tensorboard or args.tensorboard
    cfg.progress = not args.no_progress
    return apply_overrides(cfg, args.overrides)


def run_train(args: argparse.Namespace) -> int:
    from .trainer import train

    result = train(train_config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"drafter saved to {result.out} after {result.steps} steps ({result.tokens_per_s:.0f} tokens/s)")
    return 0


def run_heads_accuracy(args: argparse.Namespace) -> int:
    from .. import drafters
    from ..target import TargetModel
    from .checkpoint import atomic_write_json
    from .data import load_examples
    from .evaluate import format_table, head_accuracy

    target = TargetModel.load(args.target)
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
