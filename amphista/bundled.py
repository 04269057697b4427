"""The default target shipped inside the package: karpathy's stories260K, converted from llama2.c.

A real pretrained Llama (dim 64, 5 layers, 8 query / 4 KV heads, vocabulary 512, context 512) that writes
short children's stories. It runs anywhere with no download, which is what examples and tests need.
See docs/bundled-model.md for how it was converted and its license.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError

if TYPE_CHECKING:  # torch stays out of `amphista --help`, which reads this module's defaults
    import torch

    from .target import TargetModel

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


def default_target_path() -> Path:
    """The directory of the bundled Hugging Face model (config.json, model.safetensors, tokenizer)."""
    return Path(__file__).resolve().parent / "assets" / "stories260K"


def load_default_target(dtype: torch.dtype | None = None) -> TargetModel:
    """The bundled stories260K model and its tokenizer as a `TargetModel` (CPU, eval mode, frozen; float32
    unless `dtype` says otherwise)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from .target import TargetModel

    dtype = torch.float32 if dtype is None else dtype
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


def load_target(spec=None, dtype="auto", device=None) -> TargetModel:
    """The target a command's --target, --dtype and --device name: None for the bundled model (float32 for
    "auto"), else a folder, a .gguf file or a known name (`TargetModel.load`)."""
    from .target import TargetModel, parse_device, parse_dtype

    if spec is not None:
        return TargetModel.load(spec, dtype=dtype, device=device)
    dtype, device = parse_dtype(dtype), parse_device(device)
    target = load_default_target(None if dtype == "auto" else dtype)
    if device is not None:
        target.model.to(device)
    return target


BUNDLED_DRAFTERS = ("medusa", "amphista")


def drafter_folder(spec: str | os.PathLike, target=None) -> Path:
    """A --drafter value as a folder: "medusa" or "amphista" is the drafter of that kind shipped for `target`,
    unless a folder of that name holds a drafter (from a checkout's root, "amphista" is the package)."""
    if os.fspath(spec) in BUNDLED_DRAFTERS and not (Path(spec) / "config.json").is_file():
        return default_drafter_path(os.fspath(spec), target)
    return Path(spec)


def default_drafter_path(name: str = "amphista", target=None) -> Path:
    """The folder of a drafter shipped for `target` (default: the bundled model): "medusa" or "amphista"."""
    if name not in BUNDLED_DRAFTERS:
        raise CheckpointError(f"there is no bundled drafter {name!r}: choose one of {', '.join(BUNDLED_DRAFTERS)}")
    root = shipped_drafter_root(target)
    if root is None:
        raise CheckpointError(f"no drafters are shipped for the target {target!r}: pass a drafter folder")
    path = root / name
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


# The tree every command (generate, serve, bench, demo) verifies by default: "auto", which picks at each step
# the tree (or none) with the most expected tokens per second for the live rows, from the drafter's measured
# head accuracies (head_accuracy.json beside its weights) and this machine's measured step costs
# (docs/cost-model.md); Medusa's mc_sim_7b_63 for a drafter without that file. --tree-nodes N instead fixes
# the best N-token tree for those accuracies.
DEFAULT_TREE = "auto"
FALLBACK_TREE = "mc_sim_7b_63"

STORIES = "stories260K"
_ASSETS = Path(__file__).resolve().parent / "assets"
# Target name -> the folder holding the drafters trained for it, one subfolder per kind (medusa, amphista).
SHIPPED_DRAFTERS = {
    STORIES: _ASSETS / "drafters",
    "smollm2-135m-instruct": _ASSETS / "drafters" / "smollm2-135m-instruct",
}


def target_name(target) -> str | None:
    """The registry name of a target spec: None (the bundled model) -> "stories260K"; a known name in any
    case -> that name; the bundled model's folder -> "stories260K"; anything else -> None."""
    if target is None:
        return STORIES
    if not isinstance(target, (str, os.PathLike)):
        return None
    from .sources import holds_model

    text = os.fspath(target)
    for name in SHIPPED_DRAFTERS:
        if text.lower() == name.lower() and not holds_model(Path(text)):
            return name
    try:
        if Path(text).resolve() == default_target_path():
            return STORIES
    except OSError:
        return None
    return None


def shipped_drafter_root(target) -> Path | None:
    """Where the drafters shipped for `target` live (whether or not they are installed), or None."""
    name = target_name(target)
    return SHIPPED_DRAFTERS.get(name) if name else None


def shipped_drafters(target) -> dict[str, Path]:
    """{kind: folder} for the drafters shipped for `target` that are installed (empty when none are)."""
    root = shipped_drafter_root(target)
    if root is None:
        return {}
    return {kind: root / kind for kind in BUNDLED_DRAFTERS if (root / kind / "config.json").is_file()}
