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
    def __init__(self, vocab_size: int, hidden_size: int, num_heads: int = 4, seed: int = 0):
        super().__init__()
        self.vocab_size, self.hidden_size, self.num_heads = vocab_size, hidden_size, num_heads
        self.generator = torch.Generator().manual_seed(seed)
        self.calls: list[tuple[int, int]] = []  # (start_pos, n) of each draft call, for tests

    def reset(self, max_length: int) -> None:
        self.calls.clear()

    def _noise(self) -> torch.Tensor:
        return torch.rand(self.num_heads, self.vocab_size, generator=self.generator)  # (K, V) in [0, 1)


class RandomDrafter(_Stub):
    def draft(self, hidden, next_tokens, start_pos):
        self.calls.append((start_pos, hidden.shape[1]))
        return self._noise().to(hidden.device)


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

    def draft(self, hidden, next_tokens, start_pos):
        n = hidden.shape[1]
        self.calls.append((start_pos, n))
        last = start_pos + n - 1  # position of the newest hidden state; head k predicts last + 2 + k
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
        return logits.to(hidden.device)


class AdversarialDrafter(OracleDrafter):
    def _wrong(self, head: int) -> bool:
        return head == 0
