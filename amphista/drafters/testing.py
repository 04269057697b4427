"""Stand-in drafters with known behaviour, for testing the decode loop (not for speed).

- OracleDrafter: knows the continuation the target will produce and proposes it, with a controllable
  chance per head of putting a wrong token first (the right one then sits at rank 1).
- RandomDrafter: random logits; almost everything it proposes is rejected.
- AdversarialDrafter: head 0 is always wrong while deeper heads are right, so correct-looking tokens sit
  under rejected parents: verification must never accept them.
"""

from __future__ import annotations

import torch

from .base import Drafter


class _Stub(Drafter):
    """Logits from `_logits(last)`, a rule on the position drafted from. Batched drafting applies the same
    rule to each row's positions: right when every row decodes the same reference."""

    supports_rows = True

    def __init__(self, vocab_size: int, hidden_size: int, num_heads: int = 4, seed: int = 0):
        super().__init__()
        self.vocab_size, self.hidden_size, self.num_heads = vocab_size, hidden_size, num_heads
        self.generator = torch.Generator().manual_seed(seed)
        self.calls: list[tuple[int, int]] = []  # (start_pos, n) of each draft call, for tests
        self.row_calls: list[list[tuple[int, int]]] = []  # per draft_rows call, (start, count) of each row

    def reset(self, max_length: int) -> None:
        self.calls.clear()

    def reset_rows(self, capacity: int, max_length: int) -> None:
        self.row_calls.clear()

    def grow_rows(self, max_length: int) -> None:
        """Nothing to grow: the rule reads positions only."""

    def skip_rows(self, slots: list[int], positions: list[int]) -> None:
        """Nothing to forget: the rule reads positions only."""

    def move_row(self, src: int, dst: int) -> None:
        """Nothing to move: the rule reads positions only."""

    def draft(self, hidden, next_tokens, start_pos):
        n = hidden.shape[1]
        self.calls.append((start_pos, n))
        return self._logits(start_pos + n - 1).to(hidden.device)

    def draft_rows(self, hidden, next_tokens, start, count, depth, k, rows=None, probs=False):
        spans = list(zip(start.tolist(), count.tolist(), strict=True))
        self.row_calls.append(spans)
        if depth == 0:
            return None
        logits = torch.stack([self._logits(s + c - 1)[:depth] for s, c in spans])  # (B, depth, V)
        if probs:
            top = torch.topk(logits.softmax(-1), k, dim=-1)
            return top.indices.to(hidden.device), top.values.to(hidden.device)
        return torch.topk(logits, k, dim=-1).indices.to(hidden.device)

    def _logits(self, last: int) -> torch.Tensor:
        """(K, V) logits drafted from position `last`; head k predicts position last + 2 + k."""
        raise NotImplementedError

    def _noise(self) -> torch.Tensor:
        return torch.rand(self.num_heads, self.vocab_size, generator=self.generator)  # (K, V) in [0, 1)


class RandomDrafter(_Stub):
    def _logits(self, last):
        return self._noise()


class OracleDrafter(_Stub):
    """`reference` is the full token sequence (prompt + expected continuation)."""

    def __init__(self, reference, vocab_size, hidden_size, num_heads=4, error_rate=0.0, seed=0):
        super().__init__(vocab_size, hidden_size, num_heads, seed)
        self.reference = list(reference)
        self.error_rate = error_rate

    def _truth(self, pos: int) -> int | None:
        return self.reference[pos] if pos < len(self.reference) else None

    def _wrong(self, head: int) -> bool:
        return float(torch.rand((), generator=self.generator)) < self.error_rate

    def _logits(self, last):
        logits = self._noise()
        for head in range(self.num_heads):
            truth = self._truth(last + 2 + head)
            if truth is None:
                continue
            if self._wrong(head):
                wrong = (truth + 1 + int(torch.randint(self.vocab_size - 1, (1,), generator=self.generator))) % self.vocab_size
                logits[head, wrong] = 3.0
                logits[head, truth] = 2.0
            else:
                logits[head, truth] = 3.0
        return logits


class AdversarialDrafter(OracleDrafter):
    def _wrong(self, head: int) -> bool:
        return head == 0
