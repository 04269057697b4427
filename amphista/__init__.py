"""amphista: lossless speculative decoding with bi-directional multi-head drafters."""

from . import (
    bench,  # noqa: F401  (amphista.bench.run_benchmark(BenchConfig(...)) after `import amphista`)
    training,  # noqa: F401  (amphista.training.train(TrainConfig(...)) after `import amphista`)
)
from .bundled import load_default_drafter, load_default_target
from .decoder import SpeculativeDecoder
from .drafters import AmphistaConfig, AmphistaDrafter, Drafter, MedusaConfig, MedusaDrafter, load_drafter
from .errors import AmphistaError, CheckpointError, DrafterMismatchError, InputError, TreeError
from .generation import GenerateOutput
from .target import TargetModel
from .tree import TreeSpec, build_tree
from .vanilla import VanillaDecoder, vanilla_generate

__version__ = "0.1.0"

__all__ = [
    "AmphistaConfig",
    "AmphistaDrafter",
    "MedusaConfig",
    "MedusaDrafter",
    "load_default_drafter",
    "load_drafter",
    "AmphistaError",
    "Drafter",
    "GenerateOutput",
    "SpeculativeDecoder",
    "TreeSpec",
    "VanillaDecoder",
    "build_tree",
    "vanilla_generate",
    "load_default_target",
    "CheckpointError",
    "DrafterMismatchError",
    "InputError",
    "TargetModel",
    "TreeError",
]
