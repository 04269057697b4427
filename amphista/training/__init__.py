"""Drafter training: self-distillation, data formats, losses, the training loop and evaluation.

    from amphista.training import TrainConfig, train
    train(TrainConfig(target="path/to/model", data=["chats.jsonl"], drafter="amphista", out="runs/d1"))
"""

from .config import TrainConfig, apply_overrides
from .data import DataReport, Example, load_examples
from .distillation import DistillConfig, distill
from .evaluate import format_table, head_accuracy
from .losses import DraftLoss, head_weights
from .trainer import TrainResult, train

__all__ = [
    "DataReport",
    "DistillConfig",
    "DraftLoss",
    "Example",
    "TrainConfig",
    "TrainResult",
    "apply_overrides",
    "distill",
    "format_table",
    "head_accuracy",
    "head_weights",
    "load_examples",
    "train",
]
