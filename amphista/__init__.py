"""amphista: lossless speculative decoding with bi-directional multi-head drafters.

Names are imported on first use (PEP 562), so that `import amphista` and the command line's `--help` load
neither torch nor transformers, and the benchmark, training and serving code load only when used:
`amphista.SpeculativeDecoder`, `amphista.bench.run_benchmark`, `amphista.training.train` all still work
after a plain `import amphista`.
"""

from __future__ import annotations

from ._lazy import lazy_module

__version__ = "0.1.0"

# name -> the submodule that defines it
_EXPORTS = {
    "load_default_drafter": "bundled",
    "load_default_target": "bundled",
    "SpeculativeDecoder": "decoder",
    "AmphistaConfig": "drafters",
    "AmphistaDrafter": "drafters",
    "Drafter": "drafters",
    "MedusaConfig": "drafters",
    "MedusaDrafter": "drafters",
    "load_drafter": "drafters",
    "AmphistaError": "errors",
    "BatchingError": "errors",
    "CheckpointError": "errors",
    "DrafterMismatchError": "errors",
    "InputError": "errors",
    "TreeError": "errors",
    "GenerateOutput": "generation",
    "TargetModel": "target",
    "TreeSpec": "tree",
    "build_tree": "tree",
    "VanillaDecoder": "vanilla",
    "vanilla_generate": "vanilla",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_module(__name__, _EXPORTS)
