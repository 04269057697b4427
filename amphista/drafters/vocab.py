"""Reduced draft vocabularies: the heads predict over the N most frequent tokens of the training data, and
`d2t` (N target ids) turns a draft id back into the target's id, as EAGLE-3 and vLLM's Medusa do.

With a vocabulary of 49k tokens and a hidden size of 576, the K vocabulary heads are most of a drafter's
weights and of its cost; a few thousand tokens cover nearly every label of typical text, and a token the
heads cannot propose only costs acceptance, never correctness (the target verifies every draft).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..errors import InputError


def count_tokens(sequences: Iterable[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """(vocab_size,) int64 occurrences of each token id in `sequences` (lists or 1-D tensors of ids)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        ids = torch.as_tensor(seq, dtype=torch.long).flatten()
        if ids.numel() == 0:
            continue
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise InputError(
                f"token id {int(ids.min()) if int(ids.min()) < 0 else int(ids.max())} is outside the vocabulary "
                f"(0..{vocab_size - 1}): count tokens of data tokenized for this target"
            )
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def draft_vocab_from_counts(counts, n: int, keep: Iterable[int] = ()) -> torch.Tensor:
    """The draft vocabulary: the `n` most frequent ids of `counts` ((V,) occurrences per target id), always
    including the ids in `keep` (the target's EOS ids: a drafter that cannot propose the end of a turn
    loses a step at every one). Equal counts go to the smaller id, so the choice is deterministic.

    Returns d2t, an int64 tensor of n target ids in increasing order."""
    counts = torch.as_tensor(counts).flatten()
    V = counts.numel()
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < V:
        raise InputError(
            f"draft_vocab_size must be an integer between 1 and {V - 1} (the target has {V} tokens), got {n!r}: "
            "use 0 for the full vocabulary"
        )
    keep = sorted({int(i) for i in keep})
    bad = [i for i in keep if not 0 <= i < V]
    if bad:
        raise InputError(
            f"token ids {bad} to keep are outside the vocabulary (0..{V - 1}): pass the target's EOS ids"
        )
    if len(keep) > n:
        raise InputError(
            f"draft_vocab_size {n} cannot hold the {len(keep)} EOS ids {keep}: use a larger draft_vocab_size"
        )
    score = counts.to(torch.float64).clone()
    score[keep] = float("inf")  # kept ids rank first whatever their counts
    # A stable sort of the negated counts keeps ascending ids among equal counts: ties go to the smaller id.
    order = torch.sort(-score, stable=True).indices
    return order[:n].sort().values.to(torch.long)


def draft_vocab_from_tokens(
    sequences: Iterable[Sequence[int]], n: int, vocab_size: int, keep: Iterable[int] = ()
) -> torch.Tensor:
    """`draft_vocab_from_counts` over the ids of `sequences`."""
    return draft_vocab_from_counts(count_tokens(sequences, vocab_size), n, keep)


def check_d2t(d2t: torch.Tensor, n: int, vocab_size: int, error=InputError, where: str = "d2t") -> None:
    """Raise `error` unless d2t holds n distinct target ids below vocab_size."""
    fix = "rebuild it with draft_vocab_from_counts() or train the drafter again"
    if d2t.dtype != torch.long or d2t.dim() != 1:
        raise error(
            f"{where} must be a 1-D int64 tensor of target ids, got {d2t.dtype} of shape {tuple(d2t.shape)}: {fix}"
        )
    if d2t.numel() != n:
        raise error(f"{where} holds {d2t.numel()} token ids but draft_vocab_size is {n}: {fix}")
    if n and (int(d2t.min()) < 0 or int(d2t.max()) >= vocab_size):
        raise error(
            f"{where} holds token id {int(d2t.max()) if int(d2t.max()) >= vocab_size else int(d2t.min())} outside the "
            f"target's vocabulary (0..{vocab_size - 1}): the drafter was built for another target; {fix}"
        )
    if torch.unique(d2t).numel() != n:
        raise error(f"{where} names some token ids twice: {fix}")
