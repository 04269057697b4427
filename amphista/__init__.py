"""amphista: lossless speculative decoding with bi-directional multi-head drafters."""

from .errors import AmphistaError, CheckpointError, DrafterMismatchError, InputError, TreeError
from .target import TargetModel

__version__ = "0.1.0"

__all__ = [
    "AmphistaError",
    "CheckpointError",
    "DrafterMismatchError",
    "InputError",
    "TargetModel",
    "TreeError",
]
