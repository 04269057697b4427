"""Drafter training: self-distillation, data formats, losses, the training loop and evaluation.

    from amphista.training import TrainConfig, train
    train(TrainConfig(target="path/to/model", data=["chats.jsonl"], drafter="amphista", out="runs/d1"))
"""

from __future__ import annotations

from .._lazy import lazy_module

_EXPORTS = {
    "TrainConfig": "config",
    "apply_overrides": "config",
    "DataReport": "data",
    "Example": "data",
    "load_examples": "data",
    "DistillConfig": "distillation",
    "distill": "distillation",
    "format_table": "evaluate",
    "head_accuracy": "evaluate",
    "DraftLoss": "losses",
    "head_weights": "losses",
    "target_probs": "losses",
    "TrainResult": "trainer",
    "train": "trainer",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_module(__name__, _EXPORTS)
