"""Length-bucketed batches, right-padded micro-batches and the labels of each drafter head.

Right padding needs no attention mask here: target and drafter are causal over time, so pad tokens at
the end never reach a real position, and pads are never labels.
"""

from __future__ import annotations

import random

import torch

from ..errors import InputError
from .data import Example


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, window: int = 64) -> list[list[int]]:
    """The global batches of one epoch, a pure function of (seed, epoch) so a resumed run sees the same.

    Shuffle, sort by length inside windows of `window` batches (little padding), then shuffle the batch
    order. The incomplete last batch is dropped: every process must get the same number of micro-batches.
    """
    if len(lengths) < batch_size:
        raise InputError(
            f"{len(lengths)} training examples is fewer than one batch of {batch_size}: lower --batch-size"
        )
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * max(1, window)
    batches = []
    for i in range(0, len(order), span):
        part = sorted(order[i : i + span], key=lengths.__getitem__)
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids (B, T) right-padded with pad_id, loss_mask (B, T) with zeros on the padding."""
    T = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for b, ex in enumerate(examples):
        ids[b, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
        mask[b, : len(ex.loss_mask)] = torch.tensor(ex.loss_mask)
    return ids, mask


def head_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """input_ids, loss_mask (B, T) -> labels (B, T-1, K), -100 where there is no label.

    The drafter at position t reads h_t and x_{t+1}; head k predicts x_{t+2+k}."""
    B, T = input_ids.shape
    pad = torch.zeros(B, num_heads, dtype=input_ids.dtype, device=input_ids.device)
    ids = torch.cat([input_ids, pad], dim=1)  # (B, T+K)
    mask = torch.cat([loss_mask, pad], dim=1)
    labels = torch.stack([ids[:, 2 + k : 1 + k + T] for k in range(num_heads)], dim=-1)  # (B, T-1, K)
    valid = torch.stack([mask[:, 2 + k : 1 + k + T] for k in range(num_heads)], dim=-1).bool()
    return labels.masked_fill(~valid, -100)


def label_counts(examples: list[Example], num_heads: int) -> torch.Tensor:
    """(K,) number of labels per head over a whole global batch: the loss normaliser.

    Every process computes it from the same global batch, so the loss of each micro-batch can be divided
    by the global count and summing over micro-batches and processes gives the global-batch mean exactly."""
    return torch.tensor(
        [sum(sum(ex.loss_mask[2 + k :]) for ex in examples) for k in range(num_heads)], dtype=torch.float32
    )


def micro_batches(batch: list, num_micro: int) -> list[list]:
    """Split a global batch into `num_micro` equal consecutive parts (neighbours have similar lengths)."""
    size = len(batch) // num_micro
    return [batch[i * size : (i + 1) * size] for i in range(num_micro)]
