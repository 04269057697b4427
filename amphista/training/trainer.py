"""Train a drafter on a frozen target: one flat procedure, read top to bottom (nanoGPT style).

The same code runs on one process or under `accelerate launch` on several (DDP; DeepSpeed and FSDP
through accelerate's config files, see docs/training.md). Each optimizer step takes one global batch of
`batch_size` sequences; every process builds the same batch order from (seed, epoch) and takes its own
micro-batches, and each micro-batch's loss is divided by the global batch's label counts, so that any
split over processes and accumulation steps gives the same gradient as one big batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import sys
import time
from array import array
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import cpu as cpu_kernels
from ..errors import InputError
from ..target import TargetModel
from .batching import collate, epoch_batches, label_counts, micro_batches
from .checkpoint import STATE_FILE, find_checkpoint, list_checkpoints, load_state, save_state
from .config import TrainConfig, flag
from .data import check_output, load_examples
from .evaluate import format_table, head_accuracy
from .features import TargetProbs, prepare, resolve_folder, target_hidden
from .losses import DraftLoss, head_weights
from .outputs import MetricsLog, peak_memory_mb, save_outputs


@dataclass
class TrainResult:
    out: str
    steps: int
    loss: float  # mean training loss over the last log interval
    head_accuracy: dict | None
    tokens_per_s: float  # target + drafter tokens per second over the whole run, all processes
    peak_memory_mb: float


def build_drafter(cfg: TrainConfig, target: TargetModel, examples=None):
    """A fresh drafter for the target (float32 master weights), or the one in cfg.init_drafter.

    With `draft_vocab_size=N` in cfg.drafter_config, the draft vocabulary is the N most frequent label tokens
    of `examples` (the training set) plus the target's EOS ids; without `examples`, those of cfg.data."""
    from .. import drafters
    from ..drafters.vocab import draft_vocab_from_tokens

    if cfg.init_drafter:
        return drafters.load_drafter(cfg.init_drafter, target, dtype=torch.float32)
    cls = {"amphista": drafters.AmphistaDrafter, "medusa": drafters.MedusaDrafter}[cfg.drafter]
    options = dict(cfg.drafter_config)
    n = options.pop("draft_vocab_size", 0)
    if not n:
        return cls.for_target(target, dtype=torch.float32, **options)
    if examples is None:
        examples, _ = load_examples(cfg.data, target.tokenizer, cfg.seq_len)
    # Label tokens only: the heads never predict a prompt token, so prompt-heavy data would otherwise
    # spend the draft vocabulary on tokens no head is asked for.
    labels = [[t for t, m in zip(ex.input_ids, ex.loss_mask) if m] for ex in examples]
    d2t = draft_vocab_from_tokens(labels, n, target.vocab_size, target.eos_token_ids())
    return cls.for_target(target, dtype=torch.float32, d2t=d2t, **options)


def param_groups(drafter, cfg: TrainConfig, hidden_size: int | None = None) -> list[dict]:
    """ResBlocks and heads at `lr`; transformer layers (SAL, AEB, fusion, PE) at `lr_layers`."""
    lr = cfg.resolved_lr(hidden_size)
    lr_layers = cfg.lr_layers if cfg.lr_layers is not None else lr
    if hasattr(drafter, "param_groups"):
        return drafter.param_groups(lr, lr_layers)
    return [{"name": "all", "params": [p for p in drafter.parameters() if p.requires_grad], "lr": lr}]


def cosine_schedule(warmup: int, total: int, min_ratio: float):
    """lr multiplier for the update at step s: linear warmup, then cosine down to min_ratio."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def split_eval(examples, cfg: TrainConfig):
    """Hold out a deterministic `eval_fraction` (at most max_eval_examples) when no eval file is given."""
    n = min(cfg.max_eval_examples, int(round(cfg.eval_fraction * len(examples))))
    if n <= 0:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    held = set(order[:n])
    return [ex for i, ex in enumerate(examples) if i not in held], [examples[i] for i in order[:n]]


def train(cfg: TrainConfig, *, target=None, drafter=None, callback=None) -> TrainResult:
    """Train and save a drafter under cfg.out. `target`/`drafter` objects override cfg.target / a fresh
    drafter; `callback(step, metrics)` runs after every optimizer step on every process."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, set_seed

    cfg.validate()
    check_output(cfg.out, "--out", folder=True)
    for option, paths in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise InputError(f"{option}: no file {', '.join(map(repr, missing))}: check the path")
    # Found before any model loads, so that a resume that cannot work fails at once.
    ckpt = find_checkpoint(cfg.out, cfg.resume) if cfg.resume else None
    previous = previous_run(ckpt, cfg.out) if ckpt else None
    if previous is not None:
        check_resume(cfg, previous["config"], cfg.out)
    if not ckpt and list_checkpoints(cfg.out):
        raise InputError(
            f"{cfg.out!r} holds checkpoints of an earlier run: pass --resume to continue it or use another --out"
        )
    # A multi-process launch on a machine without CUDA (torchrun, or `accelerate launch --multi_gpu`)
    # trains on the CPU with gloo; accelerate would otherwise fall back to independent single processes.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    world = PartialState(cpu=cpu).num_processes
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // world)
    accum = cfg.batch_size // (micro * world)
    if accum < 1 or micro * world * accum != cfg.batch_size:
        raise InputError(
            f"batch_size {cfg.batch_size} is not micro_batch_size {micro} x {world} processes x an integer "
            "number of accumulation steps: change --batch-size or --micro-batch-size"
        )
    precision = resolve_precision(cfg.mixed_precision)
    if world == 1:
        # accelerate keeps the first run's precision for the whole process and refuses another one; a
        # single-process train() is a run of its own (a notebook may train in bf16 after an fp32 run).
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=accum, cpu=cpu)
    rank, is_main, device = accelerator.process_index, accelerator.is_main_process, accelerator.device
    # On the CPU mixed precision is for the drafter's loss only. The target's forward stays in its own dtype:
    # under bfloat16 autocast SmolLM2's gained nothing (1,100 tokens/s either way: attention and elementwise
    # work, not GEMMs) and 2% of its greedy tokens changed, while the drafter serves the float32 forward.
    on_cpu = device.type == "cpu"
    target_autocast = contextlib.nullcontext if on_cpu else accelerator.autocast
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    set_seed(cfg.seed)

    # ---- target, data, drafter -------------------------------------------------------------------
    if target is None:
        target = TargetModel.load(cfg.target, dtype=cfg.target_dtype)
    target = TargetModel.wrap(target)
    target.model.to(device)
    tokenizer = target.tokenizer
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else (target.eos_token_ids() or [0])[0]
    train_set, reports = load_examples(cfg.data, tokenizer, cfg.seq_len)
    if cfg.eval_data:
        eval_set, eval_reports = load_examples(cfg.eval_data, tokenizer, cfg.seq_len)
        reports += eval_reports
        eval_set = eval_set[: cfg.max_eval_examples]
    else:
        train_set, eval_set = split_eval(train_set, cfg)
    if is_main:
        for report in reports:
            print(report.summary())
    lengths = [len(ex.input_ids) for ex in train_set]
    data_id = {"examples": len(train_set), "fingerprint": fingerprint(train_set)}
    if previous is not None and previous.get("data") not in (None, data_id):
        raise InputError(
            f"cannot resume the run in {cfg.out!r}: its training data differs from this run's "
            f"({previous['data']['examples']} examples then, {len(train_set)} now"
            f"{', same count but other tokens' if previous['data']['examples'] == len(train_set) else ''}): "
            "pass the same --data (and --seq-len / --eval-data) to resume it, or use another --out"
        )

    drafter = drafter if drafter is not None else build_drafter(cfg, target, train_set)
    drafter.to(device).train()
    K = drafter.num_heads
    optimizer = torch.optim.AdamW(
        param_groups(drafter, cfg, target.hidden_size), betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )
    steps_per_epoch = len(epoch_batches(lengths, cfg.batch_size, cfg.seed, 0, cfg.bucket_window))
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = int(round(cfg.warmup_ratio * max_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(warmup, max_steps, cfg.min_lr_ratio))
    weights = head_weights(K, cfg.head_weighting, cfg.head_decay)
    model = DraftLoss(drafter, weights, cfg.lm_weight, cfg.align_weight, cfg.logits_chunk)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed reads the micro-batch size from a dataloader; batches here are built by hand.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # not prepared: accelerate would step it per process

    # ---- target features: computed once per (target, data), read back by every epoch and later run -----
    folder = resolve_folder(cfg.feature_cache)
    features = None
    if folder is not None:
        features = prepare(
            target, train_set, folder=folder, seq_len=cfg.seq_len, precision="no" if on_cpu else precision,
            dtype_setting=cfg.feature_dtype, batch_size=micro, pad_id=pad_id, autocast=target_autocast,
            # A run shorter than an epoch gains nothing from writing the entry first. An epoch is the loader's
            # (its last partial batch dropped), not len(train_set) / batch_size: comparing with the latter
            # left one epoch of data that the batch size does not divide uncached, for the next drafter too.
            build=max_steps >= steps_per_epoch, is_builder=accelerator.is_local_main_process,
            progress=is_main and cfg.progress, log=print if is_main else (lambda *a, **k: None),
        )  # fmt: skip
    accelerator.wait_for_everyone()
    target_probs = TargetProbs(target, getattr(drafter, "d2t", None))
    if device.type == "cpu":
        keep_freed_memory()

    # ---- resume ------------------------------------------------------------------------------------
    step, epoch, cursor = 0, 0, 0  # optimizer steps done; data position: epoch, next batch in it
    if ckpt:
        info = load_state(accelerator, ckpt)
        step, epoch, cursor = info["step"], info["epoch"], info["cursor"]
        if is_main:
            print(f"resumed from {ckpt} at step {step}")
    # What a resume checks against: the settings and data this checkpoint's run trained with.
    run_info, keep = {"config": cfg.to_json(), "data": data_id}, cfg.keep_checkpoints
    log = MetricsLog(cfg.out, resume_step=step, enabled=is_main, tensorboard=cfg.tensorboard)

    # ---- train -------------------------------------------------------------------------------------
    batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.bucket_window)
    bar = tqdm(total=max_steps, initial=step, disable=not (is_main and cfg.progress), desc="train", unit="step")
    sums = torch.zeros(4, K, device=device)  # per head since the last log: lm, align, hits, labels
    loss_sum, window_steps, window_tokens, run_tokens = torch.zeros((), device=device), 0, 0, 0
    run_start = window_start = time.perf_counter()
    metrics = {}
    while step < max_steps:
        if cursor >= len(batches):
            epoch, cursor = epoch + 1, 0
            batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.bucket_window)
        examples = [train_set[i] for i in batches[cursor]]
        cursor += 1
        norm = label_counts(examples, K).to(device)  # (K,) labels per head in the whole global batch
        index = batches[cursor - 1]
        for rows in micro_batches(list(range(len(examples))), world * accum)[rank::world]:
            part = [examples[i] for i in rows]
            ids, mask = collate(part, pad_id)  # (B, T) each, right-padded
            ids, mask = ids.to(device), mask.to(device)
            if features is not None:
                hidden = features.hidden([index[i] for i in rows], device)  # (B, T, d) float32
            else:
                with target_autocast():
                    hidden = target_hidden(target, ids)  # (B, T, d)
                # A fresh tensor outside inference mode: autograd must be able to save it for backward.
                hidden = hidden.to(torch.float32).clone()
            with accelerator.autocast():
                probs = target_probs(hidden, mask)  # (B, T, V or N) float32, only the rows the loss reads
            with accelerator.accumulate(model):
                loss, stats = model(hidden, ids, mask, probs, norm)
                # The loss is already this micro-batch's share of the global mean: undo accelerate's
                # division by the accumulation steps and DDP's average over processes.
                accelerator.backward(loss * world * accum)
            loss_sum += loss.detach()
            sums += stats
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        tokens = sum(len(ex.input_ids) for ex in examples)
        window_tokens, run_tokens = window_tokens + tokens, run_tokens + tokens

        if step % cfg.log_every == 0 or step == max_steps:
            total = accelerator.reduce(torch.cat([sums.flatten(), loss_sum.view(1)]), reduction="sum").cpu()
            now = time.perf_counter()
            metrics = log.record(
                step, epoch, scheduler.get_last_lr()[0], total[:-1].view(4, K), float(total[-1]) / window_steps,
                None if grad_norm is None else float(grad_norm), window_tokens / (now - window_start),
                peak_memory_mb(device),
            )
            if metrics:
                bar.set_postfix_str(log.postfix(metrics))
            sums.zero_()
            loss_sum.zero_()
            window_steps, window_tokens, window_start = 0, 0, now
        bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < max_steps:
            save_state(accelerator, cfg.out, step, {"epoch": epoch, "cursor": cursor, **run_info}, keep)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < max_steps and eval_set:
            result = evaluate(accelerator, model, cfg, target, eval_set, pad_id, sharded)
            log.write({"step": step, "eval": result})
        if callback is not None:
            callback(step, metrics)
    bar.close()
    run_time = time.perf_counter() - run_start

    # ---- final checkpoint, held-out accuracy, the drafter itself -------------------------------------
    save_state(accelerator, cfg.out, step, {"epoch": epoch, "cursor": cursor, **run_info}, keep)
    result = evaluate(accelerator, model, cfg, target, eval_set, pad_id, sharded) if eval_set else None
    final = full_drafter(accelerator, model, cfg, target, sharded)
    if is_main:
        save_outputs(cfg, final, result, steps=step)
        if result:
            log.write({"step": step, "eval": result})
            print(format_table(result))
    accelerator.wait_for_everyone()
    log.close()
    last = log.last or {}
    return TrainResult(
        cfg.out, step, float(last.get("loss", float("nan"))), result, run_tokens / max(run_time, 1e-9),
        peak_memory_mb(device),
    )


# Settings whose change makes a resumed run differ from the interrupted one: the data stream (batches,
# eval split), the drafter's shape, the optimizer and the lr schedule. micro_batch_size only changes how
# a global batch is split (same gradient), and paths, precision and logging change no trained number.
RESUME_KEYS = (
    "drafter", "seq_len", "batch_size", "max_steps", "epochs", "lr", "lr_layers", "seed", "eval_fraction",
    "max_eval_examples", "bucket_window", "weight_decay", "betas", "warmup_ratio", "min_lr_ratio",
    "max_grad_norm", "lm_weight", "align_weight", "head_weighting", "head_decay",
)  # fmt: skip


def keep_freed_memory() -> None:
    """Let glibc keep freed blocks of up to 32 MiB (its ceiling) in the heap instead of unmapping them at
    free(): each step allocates the same large activations again, and every fresh mapping is paged in by
    the kernel (minor faults, ~25% of the CPU time of a training run in issue 14). Larger tensors are
    mapped regardless; the vocabulary-sized ones are reused buffers (features.TargetProbs)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: do not hand the heap's top back after each step
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: its maximum on 64-bit glibc
    except (OSError, AttributeError):
        pass  # not glibc (musl): nothing to tune


def fingerprint(examples) -> str:
    """A digest of the training examples' tokens and label masks, in order."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(array("q", [len(ex.input_ids), *ex.input_ids, *ex.loss_mask]).tobytes())
    return digest.hexdigest()[:16]


def previous_run(ckpt: str, out: str) -> dict | None:
    """The config (and data digest) of the run that wrote `ckpt`: from its trainer_state.json, or, for
    checkpoints written before it held them, from the run's training_config.json / drafter config.json."""
    try:
        with open(os.path.join(ckpt, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None  # load_state reports the damaged checkpoint
    if isinstance(state.get("config"), dict):
        return {"config": state["config"], "data": state.get("data")}
    if not os.path.abspath(ckpt).startswith(os.path.join(os.path.abspath(out), "")):
        return None  # the files below describe the run in `out`, not one elsewhere
    try:
        with open(os.path.join(out, "training_config.json")) as f:
            return {"config": json.load(f), "data": None}
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(out, "config.json")) as f:
            kind = json.load(f).get("drafter_type")
    except (OSError, ValueError, AttributeError):
        return None
    return {"config": {"drafter": kind}, "data": None} if kind in ("amphista", "medusa") else None


def _resolved(config: dict, key: str):
    if key == "lr":
        lr = config.get("lr")
        return lr if lr is not None else TrainConfig(drafter=config["drafter"]).resolved_lr()
    if key == "lr_layers":
        return config.get("lr_layers") if config.get("lr_layers") is not None else _resolved(config, "lr")
    value = config.get(key, getattr(TrainConfig, key, None))
    return list(value) if isinstance(value, tuple) else value


def check_resume(cfg: TrainConfig, old: dict, out: str) -> None:
    """Refuse a resume whose settings would not continue the checkpointed run, naming each difference."""
    if old.get("drafter") and old["drafter"] != cfg.drafter:
        raise InputError(
            f"cannot resume: the run in {out!r} is a {old['drafter'].capitalize()} run and --drafter is "
            f"{cfg.drafter}: pass --drafter {old['drafter']} to resume it, or use another --out for a new "
            f"{cfg.drafter} run"
        )
    if set(old) <= {"drafter"}:
        return  # an older run that recorded only its drafter type
    new = {**cfg.to_json(), "drafter": cfg.drafter}
    diffs = []
    for key in RESUME_KEYS:
        if key == "epochs" and (old.get("max_steps") is not None or cfg.max_steps is not None):
            continue  # max_steps decides the length, epochs is unused
        a, b = _resolved(old, key), _resolved(new, key)
        if a != b:
            diffs.append(f"{flag(key)} {json.dumps(b)} (was {json.dumps(a)})")
    old_drafter, new_drafter = old.get("drafter_config") or {}, cfg.drafter_config or {}
    for key in sorted(set(old_drafter) | set(new_drafter)):
        if old_drafter.get(key) != new_drafter.get(key):
            was = json.dumps(old_drafter[key]) if key in old_drafter else "unset"
            now = json.dumps(new_drafter[key]) if key in new_drafter else "unset"
            diffs.append(f"--set {key}={now} (was {was})")
    if diffs:
        raise InputError(
            f"cannot resume the run in {out!r} with other settings: {'; '.join(diffs)}. Pass the run's values "
            "to resume it, or use another --out (with --init-drafter to start from its drafter)"
        )


def resolve_precision(setting: str) -> str:
    """`auto`: $ACCELERATE_MIXED_PRECISION when set; else bf16 on a CUDA device that supports it, or, without
    CUDA, on a CPU that multiplies bfloat16 in hardware (SmolLM2's drafters trained 1.8-2.1x faster there,
    same held-out accuracy); else no."""
    if setting != "auto":
        return setting
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return os.environ["ACCELERATE_MIXED_PRECISION"]
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_kernels.native_bf16() else "no"


def full_drafter(accelerator, model, cfg, target, sharded: bool):
    """The trained drafter as one ordinary module. Under ZeRO-3 / FSDP the weights are gathered into a
    fresh copy (get_state_dict is collective, so every process must call this)."""
    if not sharded:
        return accelerator.unwrap_model(model).drafter
    state = accelerator.get_state_dict(model)
    fresh = build_drafter(cfg, target)
    fresh.load_state_dict({k.removeprefix("drafter."): v for k, v in state.items()})
    return fresh.to(target.device)


def evaluate(accelerator, model, cfg, target, eval_set, pad_id, sharded):
    drafter = full_drafter(accelerator, model, cfg, target, sharded) if sharded else None
    result = None
    if accelerator.is_main_process:
        drafter = drafter or accelerator.unwrap_model(model).drafter
        # On the CPU in float32, as the target and the drafter's reference draft run there.
        with contextlib.nullcontext() if accelerator.device.type == "cpu" else accelerator.autocast():
            result = head_accuracy(drafter, target, eval_set, cfg.micro_batch_size or cfg.batch_size, pad_id)
    accelerator.wait_for_everyone()
    return result

