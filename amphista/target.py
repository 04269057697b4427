"""The frozen target model, reached only through its public forward.

`TargetModel` wraps any `transformers` causal LM: it runs the base model to get the last hidden state
(after the final norm) and applies the output embedding itself, so that logits are computed only at the
positions the caller needs. Tree verification passes a 4D additive float mask, depth-based position ids
and our `TreeCache` through the model's ordinary forward; no modeling file is forked.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .cpu import pack_linears
from .errors import InputError


def tree_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """`transformers`' SDPA attention, except for a grouped-query layer given a mask on the CPU.

    There `transformers` copies every key/value head `num_key_value_groups` times before calling SDPA (it
    keeps `enable_gqa` for mask-free calls, for CUDA's sake). With a tree mask on the CPU, SDPA broadcasting
    the groups itself is the same arithmetic without the copies: ~7 % off a 12-node tree forward of the
    bundled model. Everything else (no mask, CUDA, position biases, paged caches) goes to `transformers`.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    plain = not any(kwargs.get(k) is not None for k in ("position_bias", "cache", "softcap", "s_aux"))
    if attention_mask is None or groups == 1 or query.device.type != "cpu" or not plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


# Registered under its own name, with SDPA's mask builder, so that a target switched to it builds the same
# masks as with "sdpa" for prefill and plain decoding.
AttentionInterface.register("amphista_sdpa", tree_sdpa)
AttentionMaskInterface.register("amphista_sdpa", sdpa_mask)


# cuDNN's fused attention builds a new execution plan for every sequence length it meets (measured ~13 ms of
# CPU per call on an H200, bf16), and decoding meets a new length at every step: leave it out.
_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def cache_keyword(module: nn.Module) -> str:
    """The name under which `module.forward` takes a KV cache: `cache` since transformers 5.24, which
    deprecates `past_key_values` (removed in 5.40); `past_key_values` before."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def decode_attention(device: torch.device):
    """Context for decode-time forwards: every SDPA back-end but cuDNN's on CUDA; nothing on CPU."""
    return sdpa_kernel(_DECODE_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()


def attention_layout(text_config) -> tuple[int | None, list[str] | None]:
    """(sliding window or None, attention layer types or None) of a target, as tree masks need them: a window
    limits how far back a query may look; with layer types, full and sliding layers get masks of their own.
    Raises InputError for layer types tree verification cannot mask."""
    cfg = text_config
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    types = getattr(cfg, "layer_types", None)
    layer_types = sorted(set(types)) if types else None
    if layer_types:
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise InputError(
                f"the target uses attention layer types {sorted(unknown)} which tree verification does not "
                "support yet: use a model with full or sliding-window attention"
            )
        if "sliding_attention" not in layer_types:
            window = None
    return window, layer_types


def window_masks(mask: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int | None, types):
    """A 4D additive mask (B, 1, q, kv) as the target's forward takes it: unchanged without a sliding window;
    else with keys more than `window` positions behind their query hidden (q_pos (B, q) and kv_pos (B or 1,
    kv) are positions, not cache slots: a tree's nodes sit at their depth), and, for models with both layer
    types, as {"full_attention": ..., "sliding_attention": ...}."""
    if window is None:
        return mask
    too_far = (q_pos[:, None, :, None] - kv_pos[:, None, None, :]) >= window
    sliding = mask.masked_fill(too_far, torch.finfo(mask.dtype).min)
    return sliding if types is None else {"full_attention": mask, "sliding_attention": sliding}


@dataclass
class TargetOutput:
    logits: torch.Tensor | None  # (1, q, V) float32, or None when not asked for
    hidden: torch.Tensor  # (1, q, d) last hidden state after the final norm


EXPECTED_TARGET = (
    "expected a folder holding a Hugging Face causal LM (a config.json with its model_type and the weights, "
    "as written by save_pretrained), a .gguf file, or a known name (smollm2-135m-instruct)"
)


# What --dtype and `TargetModel.load(dtype=)` accept: "auto" keeps the dtype the weights were saved in.
DTYPE_NAMES = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype) -> torch.dtype | str:
    """A torch floating dtype, or "auto", for a dtype or its name; an InputError naming the choices."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower()]
    raise InputError(f"unknown dtype {dtype!r} for the target: use one of {', '.join(DTYPE_NAMES)}")


def parse_device(device) -> torch.device | None:
    """`device` (a name such as "cpu", "cuda", "cuda:1", "mps", or a torch.device) checked against this
    machine: an InputError that names the fix, instead of a failure deep inside the first forward. None (no
    device asked for) stays None."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}: use cpu, cuda, cuda:N (a GPU's index) or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
            raise InputError(
                f"device {str(device)!r}: torch {torch.__version__} ({build}) sees no CUDA GPU on this machine; "
                "use --device cpu, or install a CUDA build of torch on a machine with a GPU"
            )
        if device.index is not None and device.index >= count:
            raise InputError(
                f"device {str(device)!r}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {str(device)!r}: this machine has no MPS (Apple GPU) backend; use --device cpu")
    return device


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")


def check_model_dir(path: str | os.PathLike) -> dict:
    """The config.json of the model folder `path`, read without touching the weights; an InputError that
    says what was expected when `path` is not a Hugging Face model folder."""
    path = str(path)
    if not os.path.exists(path):
        raise InputError(f"target {path!r} does not exist: {EXPECTED_TARGET}")
    if not os.path.isdir(path):
        raise InputError(f"target {path!r} is a file, not a folder: {EXPECTED_TARGET}")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        what = "is empty" if not os.listdir(path) else "has no config.json"
        raise InputError(f"target {path!r} {what}: {EXPECTED_TARGET}")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"target {path!r}: cannot read {file} ({_first_line(e)}): {EXPECTED_TARGET}") from e
    if not isinstance(config, dict):
        raise InputError(f"target {path!r}: {file} is not a JSON object: {EXPECTED_TARGET}")
    if "drafter_type" in config:
        raise InputError(
            f"target {path!r} holds an amphista drafter ({config['drafter_type']}), not a model: pass it as the "
            "drafter (--drafter) and the model it was trained for as the target"
        )
    if not config.get("model_type"):
        raise InputError(f"target {path!r}: {file} names no model_type: {EXPECTED_TARGET}")
    return config


class TargetModel:
    """A frozen causal LM plus what the decoder needs to know about it."""

    def __init__(self, model: nn.Module, tokenizer=None):
        if getattr(model.config, "_attn_implementation", None) != "eager":
            # SDPA with GQA broadcasting; flash-attention, for one, cannot take a tree mask.
            model.set_attn_implementation("amphista_sdpa")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        # Few-row forwards (trees, drafts) on the CPU: oneDNN on reordered weights (see amphista/cpu.py).
        self.packed_linears = pack_linears(model)
        self.tokenizer = tokenizer
        self.config = model.config
        text_config = (
            model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        )
        self.text_config = text_config
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        self._cache_kwarg = cache_keyword(self.base)
        self.lm_head = model.get_output_embeddings()
        self.embed_tokens = model.get_input_embeddings()
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.hidden_size = int(text_config.hidden_size)
        self.max_context = int(getattr(text_config, "max_position_embeddings", 0) or 0) or None
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.logit_scale = getattr(text_config, "logit_scale", None)
        self.architecture = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
        self.name_or_path = getattr(model.config, "_name_or_path", "") or ""

    @classmethod
    def load(cls, path: str | os.PathLike, dtype: torch.dtype | str = "auto", device: str | None = None):
        """Load a causal LM (and its tokenizer, when present) from a local Hugging Face folder, a `.gguf`
        file, or a known name (`smollm2-135m-instruct`); a GGUF file is converted once to a cached folder
        (see `amphista.sources`).

        `dtype`: "auto" (as saved), a floating torch dtype or its name (`DTYPE_NAMES`); `device`: where the
        weights go (default: the CPU), checked against this machine first.

        Raises InputError, naming what is wrong and what was expected, for a path that is not such a folder
        (missing, empty, an amphista drafter, a model that is not a causal LM, no weights), an unknown dtype,
        or a device this machine does not have."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .sources import resolve_target

        dtype, device = parse_dtype(dtype), parse_device(device)
        given = os.fspath(path)
        path = str(resolve_target(given))
        config = check_model_dir(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        except (ValueError, KeyError) as e:  # transformers' word for "not a causal LM it knows"
            raise InputError(
                f"target {path!r} (model_type {config['model_type']!r}) cannot be loaded as a causal LM: "
                f"{_first_line(e)}; {EXPECTED_TARGET}"
            ) from e
        except OSError as e:  # typically no weights file
            raise InputError(f"target {path!r} cannot be loaded: {_first_line(e)}; {EXPECTED_TARGET}") from e
        if path != given:  # drafters record the name or file the user gave, not our cache folder
            model.config._name_or_path = given
        if device:
            model.to(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            tokenizer = None
        return cls(model, tokenizer)

    @classmethod
    def wrap(cls, target) -> TargetModel:
        if isinstance(target, TargetModel):
            return target
        if isinstance(target, (str, os.PathLike)):
            return cls.load(target)
        if isinstance(target, nn.Module) and hasattr(target, "get_output_embeddings"):
            return cls(target)
        raise InputError(
            f"cannot use {type(target).__name__} as a target: pass a transformers causal LM, "
            "a local model directory or an amphista.TargetModel"
        )

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    def eos_token_ids(self) -> list[int]:
        ids = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if ids is None:
            ids = getattr(self.text_config, "eos_token_id", None)
        if ids is None:
            return []
        return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]

    def logits(self, hidden: torch.Tensor, weight: tuple | None = None) -> torch.Tensor:
        """hidden (..., d) -> float32 logits (..., V), with the model's own scaling and soft-capping;
        `weight` (rows, bias or None) of the lm_head: the logits of those tokens only."""
        logits = self.lm_head(hidden) if weight is None else torch.nn.functional.linear(hidden, *weight)
        logits = logits.float()
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        cache=None,
        logits_at: slice | torch.Tensor | None = None,
    ) -> TargetOutput:
        """One forward. input_ids (1, q); attention_mask a 4D additive float mask (1, 1, q, kv) or None
        for plain causal attention; logits_at selects the positions whose logits are needed (None: all)."""
        with decode_attention(input_ids.device):
            out = self.base(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                use_cache=cache is not None,
                **{self._cache_kwarg: cache},
            )
        hidden = out.last_hidden_state  # (1, q, d)
        sel = hidden if logits_at is None else hidden[:, logits_at]
        return TargetOutput(logits=self.logits(sel), hidden=hidden)

    @torch.inference_mode()
    def forward_train(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-sequence forward for training: (hidden (B, T, d), logits (B, T, V) float32)."""
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state
        return hidden, self.logits(hidden)
