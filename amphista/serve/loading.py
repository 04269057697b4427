"""--target / --drafter / --tree as the `generate` and `serve` commands understand them.

--target:  omitted -> the bundled stories260K model; a folder, a .gguf file or a known name -> that causal LM.
--drafter: "none" -> vanilla decoding; "amphista" / "medusa" -> the drafter of that kind shipped for the
           target (bundled.SHIPPED_DRAFTERS); a folder -> a saved drafter; omitted -> the shipped Amphista
           drafter when there is one for the target, else vanilla decoding (with a note on stderr).
--tree:    "auto" (default when the drafter folder has head_accuracy.json) -> the cost model picks each step's
           tree for the live rows (docs/cost-model.md), or with --tree-nodes N the best N-token tree for the
           drafter's measured head accuracies; else a name ("mc_sim_7b_63", the fallback; "chain") or a tree
           JSON file. `amphista bench` and `amphista demo` choose the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .. import bundled
from ..cli import TREE_SHAPES
from ..decoder import SpeculativeDecoder
from ..errors import InputError
from ..generation import Decoder
from ..target import TargetModel
from ..tree import build_tree, load_accuracies
from ..vanilla import VanillaDecoder

DEFAULT_TREE = bundled.FALLBACK_TREE  # for a drafter without head accuracies
ACCURACY_FILE = "head_accuracy.json"


def load_target(path: str | None, device: str | None = None, dtype="auto") -> TargetModel:
    target = bundled.load_target(path, dtype, device)
    if target.tokenizer is None:
        raise InputError(
            f"the target at {path} has no tokenizer: text generation needs tokenizer files there"
        )
    return target


def load_drafter_arg(spec: str | None, target: TargetModel, target_spec: str | None = None, dtype="auto"):
    """(drafter, its folder) for `spec` (see the module docstring), or (None, None) for vanilla decoding.
    `target_spec` is the --target as given: its shipped drafters are the defaults. `dtype`: see
    drafters.precision.for_drafting."""
    from ..drafters import load_drafter
    from ..drafters.precision import for_drafting

    if spec is not None and spec.lower() == "none":
        return None, None
    if spec is None:
        shipped = bundled.shipped_drafters(target_spec)
        if "amphista" not in shipped:
            why = (
                "no drafters are shipped for this target"
                if bundled.shipped_drafter_root(target_spec) is None
                else "its shipped Amphista drafter is not installed"
            )
            print(f"amphista: no --drafter given and {why}: vanilla decoding", file=sys.stderr)
            return None, None
        path = shipped["amphista"]
    else:
        path = bundled.drafter_folder(spec, target_spec)
    return for_drafting(load_drafter(path, target), target, dtype), path


def resolve_tree(tree: str | None, drafter_dir: Path | None, nodes: int | None = None):
    """The `tree` argument of SpeculativeDecoder for --tree / --tree-nodes: "auto" (the cost model), the best
    `nodes`-token tree, or the named / file tree as given."""
    accuracies = drafter_dir / ACCURACY_FILE if drafter_dir is not None else None
    if tree == "auto" or (tree is None and accuracies is not None and accuracies.is_file()):
        if accuracies is None or not accuracies.is_file():
            raise InputError(
                f"--tree auto needs {ACCURACY_FILE} in the drafter folder ({drafter_dir}): write it with "
                "`amphista heads-accuracy`, or pass --tree mc_sim_7b_63"
            )
        return "auto" if nodes is None else build_tree(load_accuracies(accuracies, greedy=True), nodes)
    return tree or DEFAULT_TREE


def load_decoder(
    target_path: str | None,
    drafter_spec: str | None,
    tree: str | None = None,
    tree_nodes: int | None = None,
    threads: int | None = None,
    drafter_dtype="auto",
    tree_shape: str = "default",
    device: str | None = None,
    dtype="auto",
) -> Decoder:
    from ..threads import set_threads

    target = load_target(target_path, device, dtype)
    set_threads(target, threads)  # before tree="auto" measures step costs, which depend on it
    drafter, path = load_drafter_arg(drafter_spec, target, target_path, drafter_dtype)
    if drafter is None:
        return VanillaDecoder(target)
    dynamic = TREE_SHAPES[tree_shape]
    return SpeculativeDecoder(target, drafter, resolve_tree(tree, path, tree_nodes), dynamic=dynamic)
