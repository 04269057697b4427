"""Finding and loading what a benchmark runs: the target, the drafters, their trees.

Everything that can be checked from files alone (folders, config.json, head accuracies, tree files)
is checked before any model is loaded, so a typo fails in a second, not after minutes of loading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import bundled
from ..errors import CheckpointError, DrafterMismatchError, InputError
from ..target import EXPECTED_TARGET, TargetModel, check_model_dir, parse_device
from ..tree import TreeSpec, build_tree, load_accuracies

BUNDLED_DRAFTERS = ("medusa", "amphista")
TRAIN_SCRIPT = "bash scripts/train_bundled_drafters.sh"
ACCURACY_FILE = "head_accuracy.json"


def bundled_drafter_dir(name: str) -> Path:
    try:
        return Path(bundled.default_drafter_path(name))
    except CheckpointError:  # not installed: name the folder, bundled_drafters() explains what to do
        return Path(bundled.default_target_path()).parent / "drafters" / name


def bundled_drafters() -> dict[str, Path]:
    """The bundled drafter folders; a clear error naming the training script when one is missing."""
    found = {name: bundled_drafter_dir(name) for name in BUNDLED_DRAFTERS}
    missing = [name for name, p in found.items() if not (p / "config.json").is_file()]
    if missing:
        raise CheckpointError(
            f"the bundled {' and '.join(missing)} drafter{'s are' if len(missing) > 1 else ' is'} not installed "
            f"(looked in {found[missing[0]].parent}): train them with `{TRAIN_SCRIPT}`, or pass "
            "--drafter NAME=DIR"
        )
    return found


def shipped_drafters(target) -> dict[str, Path]:
    """The drafters shipped for a target given by name (see amphista.bundled.SHIPPED_DRAFTERS) that are
    installed; {} for any other target."""
    return bundled.shipped_drafters(target) if isinstance(target, (str, os.PathLike)) else {}


def drafter_note(target, fallback: str = "timing vanilla decoding only") -> str:
    """One line for a bench or demo run given a target and no --drafter: which drafters it picked, or that
    none were found and what happens instead (`fallback`)."""
    name = bundled.target_name(target)
    found = shipped_drafters(target)
    if found:
        where = found[next(iter(found))].parent
        return f"using the drafters shipped for {name}: {', '.join(found)} ({where})"
    if name is not None:
        return (
            f"no drafters are shipped for {name} in this installation (looked in "
            f"{bundled.shipped_drafter_root(target)}): {fallback}; pass --drafter NAME=DIR"
        )
    return f"no --drafter given for this target: {fallback}"


def parse_drafter_args(values: list[str] | None, target=None) -> dict[str, str]:
    """["medusa=DIR", "DIR2"] -> {"medusa": "DIR", "<basename of DIR2>": "DIR2"}; a DIR "medusa" or "amphista"
    that holds no drafter is the one of that kind shipped for `target` (bundled.drafter_folder)."""
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value.rstrip("/")).name, value
        if not name or not path:
            raise InputError(f"--drafter {value!r}: expected NAME=DIR, e.g. --drafter medusa=out/medusa")
        if name in out:
            raise InputError(f"two drafters are named {name!r}: give each --drafter a distinct NAME=DIR")
        out[name] = str(bundled.drafter_folder(path, target))
    return out


def load_target(spec, device: str | None = None, dtype="auto") -> TargetModel:
    """None: the bundled model; a folder, .gguf file or known name; or a TargetModel / transformers model
    (its own dtype, moved to `device` when one is given)."""
    if spec is None or isinstance(spec, (str, os.PathLike)):
        target = bundled.load_target(spec, dtype, device)
    else:
        target = TargetModel.wrap(spec)
        if device:
            target.model.to(parse_device(device))
    if target.tokenizer is None:
        raise InputError("the target has no tokenizer: benchmark questions are text, load a folder with one")
    return target


def target_shape(spec) -> dict | None:
    """hidden size, vocabulary and architecture of a target, from its config.json only (no weights)."""
    if spec is None:
        spec = bundled.default_target_path()
    if not isinstance(spec, (str, os.PathLike)):
        return None
    from ..sources import resolve_target

    spec = resolve_target(spec)  # a GGUF file or a known name: its (cached) converted folder
    check_model_dir(spec)
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(spec)
    except (ValueError, KeyError, OSError) as e:  # a model_type this transformers does not know
        raise InputError(f"target {str(spec)!r}: {str(e).strip().splitlines()[0]}; {EXPECTED_TARGET}") from e
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    return {"hidden_size": text.hidden_size, "vocab_size": text.vocab_size, "architecture": arch}


def check_drafter_dir(name: str, path, shape: dict | None) -> dict:
    """The drafter's config.json, checked against the target's shape; raises before loading anything."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"drafter {name!r}: {str(path)!r} is not a folder: pass a folder saved by training"
        )
    file = path / "config.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"drafter {name!r}: cannot read {file} ({e}): pass a folder saved by training"
        ) from e
    built = meta.get("built_for") or meta.get("config") or {}
    if shape:
        for key in ("vocab_size", "hidden_size", "architecture"):
            mine, theirs = built.get(key), shape.get(key)
            if mine and theirs and mine != theirs:
                raise DrafterMismatchError(
                    f"drafter {name!r} at {path} was built for a target with {key} {mine} but this target has "
                    f"{theirs}: pass a drafter trained for this target"
                )
    return meta


def load_drafter_dir(name: str, path, target: TargetModel, dtype="auto"):
    """The drafter saved in `path`, on the target's device, in `dtype` (see drafters.precision.for_drafting)."""
    from ..drafters import load_drafter
    from ..drafters.precision import for_drafting

    return for_drafting(load_drafter(path, target), target, dtype)


def accuracies_for(name: str, path, override=None, greedy: bool = False) -> list[list[float]]:
    """Per-head top-k accuracies: `override` (a file or the list itself), else head_accuracy.json beside
    the drafter's weights; against the target's argmax for greedy runs (see tree.load_accuracies)."""
    if isinstance(override, list):
        return override
    file = Path(override) if override is not None else (Path(path) / ACCURACY_FILE if path else None)
    if file is None or not file.is_file():
        where = f"{file}" if file is not None else "(no folder: the drafter was passed as an object)"
        raise InputError(
            f"drafter {name!r} has no head accuracies {where}: tree building needs {ACCURACY_FILE} next to the "
            "drafter's weights; write it with `amphista heads-accuracy` or pass head accuracies explicitly"
        )
    return load_accuracies(file, greedy)


def tree_for(tree, nodes: int | None, accuracies=None) -> TreeSpec | str:
    """ "auto" with `nodes` builds the best `nodes`-token tree from head accuracies; without, "auto" stays (the
    decoder's cost model chooses); anything else is passed through."""
    if isinstance(tree, str) and tree == "auto" and nodes is not None:
        return build_tree(accuracies, nodes)
    return tree


def check_tree(tree) -> None:
    """Validate a named tree, a tree file or a path list now ("chain" and "auto" depend on the drafter)."""
    if tree is None or (isinstance(tree, str) and tree in ("chain", "auto")):
        return
    TreeSpec.load(tree)
