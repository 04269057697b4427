"""The default target shipped inside the package: karpathy's stories260K, converted from llama2.c.

A real pretrained Llama (dim 64, 5 layers, 8 query / 4 KV heads, vocabulary 512, context 512) that writes
short children's stories. It runs anywhere with no download, which is what examples and tests need.
See docs/bundled-model.md for how it was converted and its license.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import CheckpointError
from .target import TargetModel

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


def default_target_path() -> Path:
    """The directory of the bundled Hugging Face model (config.json, model.safetensors, tokenizer)."""
    return Path(__file__).resolve().parent / "assets" / "stories260K"


def load_default_target(dtype: torch.dtype = torch.float32) -> TargetModel:
    """The bundled stories260K model and its tokenizer as a `TargetModel` (CPU, eval mode, frozen)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = default_target_path()
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"the bundled model at {str(path)!r} lacks {', '.join(missing)}: reinstall amphista, or rebuild it "
            "with `amphista convert-llama2c` as described in docs/bundled-model.md"
        )
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return TargetModel(model, tokenizer)


BUNDLED_DRAFTERS = ("medusa", "amphista")


def default_drafter_path(name: str = "amphista") -> Path:
    """The folder of a drafter trained for the bundled model: "medusa" or "amphista"."""
    if name not in BUNDLED_DRAFTERS:
        raise CheckpointError(f"there is no bundled drafter {name!r}: choose one of {', '.join(BUNDLED_DRAFTERS)}")
    path = Path(__file__).resolve().parent / "assets" / "drafters" / name
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"the bundled {name} drafter is missing from {str(path)!r}: reinstall amphista, or train it with "
            "`bash scripts/train_bundled_drafters.sh`"
        )
    return path


def load_default_drafter(name: str = "amphista", target: TargetModel | None = None):
    """A bundled drafter, attached to `target` (the bundled model when omitted)."""
    from .drafters import load_drafter

    return load_drafter(default_drafter_path(name), target if target is not None else load_default_target())
