"""--target / --drafter / --tree as the `generate` and `serve` commands understand them.

--target:  omitted -> the bundled stories260K model; a folder -> a Hugging Face causal LM.
--drafter: "none" -> vanilla decoding; "amphista" / "medusa" -> the bundled drafter of that kind;
           a folder -> a saved drafter; omitted -> the bundled Amphista drafter when the target is the bundled
           model and the drafter is installed, else vanilla decoding (with a note on stderr).
--tree:    "auto" (default when the drafter folder has head_accuracy.json) -> the best --tree-nodes-token tree
           for the drafter's measured head accuracies; else a name ("mc_sim_7b_63", the fallback; "chain")
           or a tree JSON file. Small targets verify few tokens fastest, hence bundled.DEFAULT_TREE_NODES (8)
           by default, the same default as `amphista bench` and `amphista demo`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .. import bundled
from ..decoder import SpeculativeDecoder
from ..errors import CheckpointError, InputError
from ..generation import Decoder
from ..target import TargetModel
from ..tree import build_tree, load_accuracies
from ..vanilla import VanillaDecoder

DEFAULT_TREE = bundled.FALLBACK_TREE  # for a drafter without head accuracies
ACCURACY_FILE = "head_accuracy.json"


def load_target(path: str | None) -> TargetModel:
    target = bundled.load_default_target() if path is None else TargetModel.load(path)
    if target.tokenizer is None:
        raise InputError(
            f"the target at {path} has no tokenizer: text generation needs tokenizer files there"
        )
    return target


def _bundled_drafter_dir(name: str) -> Path:
    return Path(bundled.default_drafter_path(name))


def load_drafter_arg(spec: str | None, target: TargetModel, target_is_bundled: bool):
    """(drafter, its folder) for `spec` (see the module docstring), or (None, None) for vanilla decoding."""
    from ..drafters import load_drafter

    if spec is not None and spec.lower() == "none":
        return None, None
    if spec is None:
        if not target_is_bundled:
            print("amphista: no --drafter given: vanilla decoding", file=sys.stderr)
            return None, None
        try:
            path = _bundled_drafter_dir("amphista")
        except CheckpointError:
            print(
                "amphista: the bundled Amphista drafter is not installed: vanilla decoding", file=sys.stderr
            )
            return None, None
    elif spec in bundled.BUNDLED_DRAFTERS and not Path(spec).exists():
        path = _bundled_drafter_dir(spec)
    else:
        path = Path(spec)
    drafter = load_drafter(path, target)
    return drafter.to(device=target.device, dtype=target.dtype), path


def resolve_tree(tree: str | None, drafter_dir: Path | None, nodes: int = bundled.DEFAULT_TREE_NODES):
    accuracies = drafter_dir / ACCURACY_FILE if drafter_dir is not None else None
    if tree == "auto" or (tree is None and accuracies is not None and accuracies.is_file()):
        if accuracies is None or not accuracies.is_file():
            raise InputError(
                f"--tree auto needs {ACCURACY_FILE} in the drafter folder ({drafter_dir}): write it with "
                "`amphista heads-accuracy`, or pass --tree mc_sim_7b_63"
            )
        return build_tree(load_accuracies(accuracies), nodes)
    return tree or DEFAULT_TREE


def load_decoder(
    target_path: str | None,
    drafter_spec: str | None,
    tree: str | None = None,
    tree_nodes: int = bundled.DEFAULT_TREE_NODES,
) -> Decoder:
    target = load_target(target_path)
    drafter, path = load_drafter_arg(drafter_spec, target, target_is_bundled=target_path is None)
    if drafter is None:
        return VanillaDecoder(target)
    return SpeculativeDecoder(target, drafter, resolve_tree(tree, path, tree_nodes))
