"""Training configuration: one dataclass, saved next to the trained drafter and into every checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field

from ..cli import TARGET_DTYPES
from ..errors import InputError

DRAFTERS = ("amphista", "medusa")
# Best of those tried on the bundled model (hidden size 64; docs/method.md, Training). Wider targets get
# these scaled by sqrt(64 / hidden_size) (see resolved_lr): Amphista at 3e-3 diverged on SmolLM2-135M
# (hidden 576) where 1e-3 = 3e-3 * sqrt(64/576) was stable, and Medusa-1's paper used 1e-3 at 7B (4096).
DEFAULT_LR = {"amphista": 3e-3, "medusa": 1e-2}
LR_REFERENCE_HIDDEN = 64


# Command-line flags of TrainConfig fields; the others are set with `--set name=value`.
FLAGS = {
    "target": "--target", "data": "--data", "out": "--out", "drafter": "--drafter", "init_drafter": "--init-drafter",
    "eval_data": "--eval-data", "seq_len": "--seq-len", "batch_size": "--batch-size",
    "micro_batch_size": "--micro-batch-size", "max_steps": "--max-steps", "epochs": "--epochs", "lr": "--lr",
    "lr_layers": "--lr-layers", "seed": "--seed", "save_every": "--save-every", "tensorboard": "--tensorboard",
    "feature_cache": "--feature-cache",
}  # fmt: skip


def flag(name: str) -> str:
    """How a user sets the field `name`: its flag, or `--set name`."""
    return FLAGS.get(name, f"--set {name}")


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _at_most_one(v):
    return v <= 1


def _below_one(v):
    return v < 1


# (field, lower check, upper check, the rule in words) for every numeric field validate() checks.
NUMBER_RULES = [
    ("seq_len", _positive, None, "at least 3"),
    ("batch_size", _positive, None, "at least 1"),
    ("micro_batch_size", _positive, None, "at least 1"),
    ("max_steps", _positive, None, "at least 1 (leave it out to train --epochs)"),
    ("epochs", _positive, None, "above 0"),
    ("lr", _positive, None, "above 0"),
    ("lr_layers", _positive, None, "above 0"),
    ("eval_fraction", _non_negative, _below_one, "in [0, 1)"),
    ("max_eval_examples", _non_negative, None, "0 or more"),
    ("bucket_window", _positive, None, "at least 1"),
    ("weight_decay", _non_negative, None, "0 or more"),
    ("warmup_ratio", _non_negative, _at_most_one, "in [0, 1]"),
    ("min_lr_ratio", _non_negative, _at_most_one, "in [0, 1]"),
    ("max_grad_norm", _non_negative, None, "0 (no clipping) or more"),
    ("lm_weight", _non_negative, None, "0 or more"),
    ("align_weight", _non_negative, None, "0 or more"),
    ("head_decay", _positive, None, "above 0"),
    ("logits_chunk", _non_negative, None, "0 (auto) or more"),
    ("seed", _non_negative, None, "0 or more"),
    ("log_every", _positive, None, "at least 1"),
    ("save_every", _non_negative, None, "0 (only at the end) or more"),
    ("keep_checkpoints", _non_negative, None, "0 (keep all) or more"),
    ("eval_every", _non_negative, None, "0 (only at the end) or more"),
]
INTEGERS = {
    "seq_len", "batch_size", "micro_batch_size", "max_steps", "max_eval_examples", "bucket_window", "logits_chunk",
    "seed", "log_every", "save_every", "keep_checkpoints", "eval_every",
}  # fmt: skip
OPTIONAL = {"micro_batch_size", "max_steps", "lr", "lr_layers"}  # None: derived from other fields


@dataclass
class TrainConfig:
    target: str = ""  # Hugging Face model folder, .gguf file or known name (frozen)
    data: list[str] = field(default_factory=list)  # ShareGPT / messages / Alpaca / text files
    out: str = ""  # output folder: the drafter, its config, metrics, checkpoints
    drafter: str = "amphista"  # amphista | medusa
    drafter_config: dict = field(default_factory=dict)  # passed to Drafter.for_target(target, **cfg)
    init_drafter: str | None = None  # start from an existing drafter folder instead of a fresh one

    # data
    eval_data: list[str] = field(default_factory=list)  # held-out files; empty: split off eval_fraction
    eval_fraction: float = 0.05
    max_eval_examples: int = 256
    seq_len: int = 512  # longer examples are truncated (chat) or cut into windows (text)
    bucket_window: int = 64  # batches per length-sorting window: less padding, still shuffled

    # schedule
    batch_size: int = 8  # sequences per optimizer step, over all processes
    micro_batch_size: int | None = None  # per process and forward; None: batch_size / processes
    max_steps: int | None = None  # takes precedence over epochs
    epochs: float = 1.0
    lr: float | None = None  # ResBlocks and heads; None: DEFAULT_LR of the drafter kind
    lr_layers: float | None = None  # transformer layers (SAL, AEB); None: same as lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr
    max_grad_norm: float = 1.0

    # loss
    lm_weight: float = 1.0  # cross-entropy to the data token
    align_weight: float = 1.0  # cross-entropy to the frozen target's distribution
    head_weighting: str = "decay"  # decay: w_k = head_decay ** k | equal
    head_decay: float = 0.8
    logits_chunk: int = 0  # positions per vocab-logit chunk (recomputed in backward); 0: auto

    # the target's hidden states, computed once and read back (training/features.py)
    feature_cache: str | None = "auto"  # a folder; auto: $AMPHISTA_CACHE/features; None: no cache
    feature_dtype: str = "auto"  # float32 | float16 | bfloat16; auto: a 16-bit target's own, else float16

    # machinery
    mixed_precision: str = "auto"  # no | bf16 | fp16; auto: bf16 on CUDA or a CPU with native bf16, else no
    target_dtype: str = "auto"  # the target's weights (target.DTYPE_NAMES); auto: as saved
    seed: int = 0
    log_every: int = 10
    save_every: int = 200  # checkpoint every N optimizer steps (and always at the end); 0: end only
    keep_checkpoints: int = 2
    eval_every: int = 0  # held-out accuracy every N steps; 0: at the end only
    tensorboard: bool = False
    progress: bool = True
    resume: bool | str = False  # True: latest checkpoint under out/checkpoints; or a checkpoint path

    def __post_init__(self):
        # Paths may come as pathlib.Path; the config is written to JSON and compared on resume as text.
        for name in ("target", "out", "init_drafter", "feature_cache"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        if isinstance(self.resume, os.PathLike):
            self.resume = os.fspath(self.resume)
        for name in ("data", "eval_data"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)):  # one file given bare
                value = [value]
            setattr(self, name, [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value])

    def resolved_lr(self, hidden_size: int | None = None) -> float:
        """`lr`, else the drafter kind's default scaled down for targets wider than the bundled one."""
        if self.lr is not None:
            return self.lr
        scale = min(1.0, (LR_REFERENCE_HIDDEN / hidden_size) ** 0.5) if hidden_size else 1.0
        return DEFAULT_LR.get(self.drafter, 1e-3) * scale

    def validate(self) -> None:
        if self.drafter not in DRAFTERS:
            raise InputError(f"unknown drafter {self.drafter!r}: use one of {', '.join(DRAFTERS)}")
        if not self.data:
            raise InputError("no training data: pass one or more files with --data")
        if not self.out:
            raise InputError("no output folder: pass --out DIR")
        if self.head_weighting not in ("decay", "equal"):
            raise InputError(f"head_weighting is {self.head_weighting!r}: use 'decay' or 'equal'")
        if self.feature_dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise InputError(
                f"feature_dtype is {self.feature_dtype!r}: use auto, float32, float16 or bfloat16 (--set feature_dtype=...)"
            )
        if not isinstance(self.target_dtype, str) or self.target_dtype.lower() not in TARGET_DTYPES:
            raise InputError(
                f"target_dtype is {self.target_dtype!r}: use one of {', '.join(TARGET_DTYPES)} (--set target_dtype=...)"
            )
        if self.feature_cache is not None and not isinstance(self.feature_cache, str):
            raise InputError(
                f"--feature-cache is {self.feature_cache!r}: give a folder, or --no-feature-cache"
            )
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise InputError(f"mixed_precision is {self.mixed_precision!r}: use auto, no, bf16 or fp16")
        for name, low, high, what in NUMBER_RULES:
            value = getattr(self, name)
            if value is None and name in OPTIONAL:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or (name in INTEGERS and not isinstance(value, int))
            ):
                kind = "an integer" if name in INTEGERS else "a number"
                raise InputError(f"{flag(name)} is {value!r}: it must be {kind}, {what}")
            # `not (a <= v)` rather than `v < a`, so that NaN fails too.
            if not ((low is None or low(value)) and (high is None or high(value))):
                raise InputError(f"{flag(name)} is {value!r}: it must be {what}")
        if self.seq_len < 3:
            raise InputError(
                f"{flag('seq_len')} is {self.seq_len}: a sequence needs at least 3 tokens to train on"
            )
        if self.lm_weight == 0 and self.align_weight == 0:
            raise InputError(
                "lm_weight and align_weight are both 0: nothing to train on; set one above 0 with --set"
            )
        if not (
            isinstance(self.betas, (list, tuple))
            and len(self.betas) == 2
            and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas
            )
        ):
            raise InputError(
                f"betas is {self.betas!r}: give two numbers in [0, 1), e.g. --set betas=[0.9,0.999]"
            )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        if isinstance(cfg.betas, list):
            cfg.betas = tuple(cfg.betas)
        return cfg


def parse_value(text: str):
    """`--set` values: JSON when they parse (numbers, true/false, null, lists), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: TrainConfig, pairs: list[str]) -> TrainConfig:
    """Apply `key=value` pairs: TrainConfig fields by name, anything else goes to the drafter config.

    `drafter.key=value` forces the drafter config (for a name both define)."""
    hints = typing.get_type_hints(TrainConfig)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--set {pair!r}: write key=value, e.g. --set num_heads=5")
        value = parse_value(raw)
        if key.startswith("drafter."):
            cfg.drafter_config[key.removeprefix("drafter.")] = value
        elif key in hints and key != "drafter_config":
            setattr(cfg, key, _coerce(key, value, hints[key]))
        else:
            cfg.drafter_config[key] = value
    return cfg


def _coerce(key: str, value, hint):
    """Check a `--set` value against the field's annotation; ints are accepted where floats are."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if union else (hint,)
    if value is None and type(None) in args:
        return None
    for t in args:
        origin = typing.get_origin(t) or t
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is list:
            return value if isinstance(value, list) else [value]
        if origin is tuple and isinstance(value, list):
            return tuple(value)
        if origin in (int, str, bool, dict) and type(value) is origin:
            return value
    if str in args:
        return str(value)
    raise InputError(f"--set {key}={value!r}: expected {hint}")
