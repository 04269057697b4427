"""Loading drafters saved in the Hugging Face layout (drafters/saving.py writes it): config.json names the
drafter type, and `DRAFTERS` maps each type to its class -- a new drafter is its module plus one entry there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError, InputError
from .amphista import AmphistaDrafter
from .common import HeadDrafter
from .medusa import MedusaDrafter
from .saving import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME
from .vocab import check_d2t

DRAFTERS: dict[str, type[HeadDrafter]] = {cls.drafter_type: cls for cls in (MedusaDrafter, AmphistaDrafter)}


def read_config(path) -> dict:
    path = Path(path)
    file = path / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(
            f"no {CONFIG_NAME} in {path}: pass a folder written by drafter.save_pretrained()"
        )
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{file} is not valid JSON ({e}): the checkpoint is corrupt, save it again"
        ) from e
    if not isinstance(meta, dict) or "drafter_type" not in meta or "config" not in meta:
        raise CheckpointError(f"{file} is not an amphista drafter config (no drafter_type/config)")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{file} has no integer format_version: the checkpoint is corrupt")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written in drafter format {version} but this amphista reads format {FORMAT_VERSION} "
            "at most: upgrade amphista"
        )
    if meta["drafter_type"] not in DRAFTERS:
        raise CheckpointError(
            f"{file} names drafter type {meta['drafter_type']!r}; this amphista knows {sorted(DRAFTERS)}"
        )
    return meta


def load_drafter(path, target=None, *, device=None, dtype=None) -> HeadDrafter:
    """Rebuild a saved drafter; with `target`, check it fits and attach it (on the target's device).

    dtype defaults to the dtype it was saved in."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"drafter checkpoint {path} does not exist or is not a folder")
    meta = read_config(path)
    cls = DRAFTERS[meta["drafter_type"]]
    try:
        config = cls.config_class.from_dict(meta["config"])
    except (InputError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: {e}") from e
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"no {WEIGHTS_NAME} in {path}: the checkpoint is incomplete, save it again")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} cannot be read ({e}): the file is corrupt, save it again") from e

    with torch.device("meta"):
        drafter = cls(config)  # no memory, no random init: the weights replace everything below
    try:
        drafter.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights} does not match its {CONFIG_NAME}: {e}") from e
    if config.draft_vocab_size:
        check_d2t(drafter.d2t, config.draft_vocab_size, config.vocab_size, CheckpointError, f"{weights}: d2t")
    drafter.built_for = dict(meta.get("built_for") or drafter.built_for)
    # Measured head accuracies beside the weights let SpeculativeDecoder(tree="auto") fit its trees.
    accuracy = path / "head_accuracy.json"
    drafter.accuracy_file = accuracy if accuracy.is_file() else None
    if target is not None:
        drafter.attach(target)  # raises DrafterMismatchError before anything is moved
        device = device or drafter._borrowed().lm_head.weight.device
    drafter.to(device=device or "cpu", dtype=dtype or getattr(torch, meta.get("dtype", "float32")))
    return drafter
