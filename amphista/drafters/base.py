"""The drafter interface the decode loop speaks.

A drafter reads the target's last hidden state h_t (post final norm) and the token x_{t+1} the target
committed after it, and returns K rows of logits: row k (0-based) predicts token t+2+k, i.e. the
(k+1)-th token after x_{t+1}. The loop never asks which drafter it has.

Incremental use, one sequence at a time:
    drafter.reset(max_length)                       # new sequence, caches for up to max_length positions
    logits = drafter.draft(hidden, next_tokens, start_pos)   # prefill: all prompt positions
    ...verify, commit m+1 tokens...
    logits = drafter.draft(hidden_new, next_new, start_pos)  # exactly the newly committed positions

Batched use, B sequences at once (drafters with `supports_rows`), each row with its own committed length:
    drafter.reset_rows(capacity, max_length)        # forget every sequence; state slots for `capacity` rows
    top = drafter.draft_rows(hidden, next_tokens, start, count, depth, k)   # (B, depth, k) target ids
    drafter.move_row(src, dst)                      # slot src's state now lives in slot dst
    drafter.grow_rows(max_length)                   # room for longer rows, every row's state kept
    drafter.skip_rows(slots, positions)             # those slots forget what came before
Each row's newly committed positions are left-aligned and padded to a common n: hidden (B, n, d),
next_tokens (B, n); start and count, (B,) long tensors on the drafter's device, say that row b's real
entries are positions start[b] .. start[b]+count[b]-1. As in the single path, a start below the row's
committed length rewrites (a rollback).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DrafterMismatchError, InputError


class Drafter(nn.Module):
    """What SpeculativeDecoder needs from a drafter; subclass it to plug in your own.

    Subclasses set `num_heads` (K, the number of tokens drafted ahead), `hidden_size` and `vocab_size` (the
    target's), and implement `draft`; `reset` and `attach` have working defaults. The contract is in this
    module's docstring. AmphistaDrafter and MedusaDrafter are the trained ones; amphista.drafters also has
    OracleDrafter and RandomDrafter for tests. Batched decoding needs `supports_rows` and the three row
    methods; without them a drafter still serves batch size 1.
    """

    num_heads: int
    hidden_size: int
    vocab_size: int
    supports_rows: bool = False  # True where reset_rows, draft_rows and move_row are implemented
    # Whether a draft reads positions before the last one (a cache it appends to): then the first draft after
    # plain steps has all of theirs to read, which `tree="auto"` weighs before leaving plain decoding.
    keeps_state: bool = True

    def reset(self, max_length: int) -> None:
        """Forget the previous sequence; make room for `max_length` committed positions."""

    def draft(self, hidden: torch.Tensor, next_tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Append newly committed positions and draft from the last one.

        hidden:      (1, n, d)  target hidden states at positions start_pos .. start_pos+n-1
        next_tokens: (1, n)     token committed right after each of those positions (x_{t+1})
        returns:     (K, V)     per-head logits for the last position
        """
        raise NotImplementedError

    def draft_topk(self, hidden: torch.Tensor, next_tokens: torch.Tensor, start_pos: int, depth: int, k: int):
        """As `draft`, then the target ids of each of the first `depth` heads' k best tokens: (depth, k).

        Drafters with a reduced draft vocabulary override it to take the top-k over their N tokens and map
        only the winners to target ids, instead of spreading N logits over V."""
        return torch.topk(self.draft(hidden, next_tokens, start_pos)[:depth], k, dim=-1).indices

    def draft_topk_probs(self, hidden: torch.Tensor, next_tokens: torch.Tensor, start_pos: int, depth: int, k: int):
        """As `draft_topk`, with the drafter's own probabilities of those tokens: ((depth, k) target ids,
        (depth, k) float32 probabilities, best first). Dynamic trees are shaped from them."""
        probs = self.draft(hidden, next_tokens, start_pos)[:depth].float().softmax(-1)
        top = torch.topk(probs, k, dim=-1)
        return top.indices, top.values

    def reset_rows(self, capacity: int, max_length: int) -> None:
        """Forget every sequence; make room for `capacity` rows (state slots) of up to `max_length` committed
        positions each."""
        self._no_rows()

    def draft_rows(
        self, hidden, next_tokens, start, count, depth: int, k: int, rows: slice | None = None, probs: bool = False
    ):
        """Append each row's newly committed positions and draft from its last one.

        hidden:      (B, n, d)  row b's new positions left-aligned: [:count[b]] are real, the rest padding
        next_tokens: (B, n)     the token committed right after each position (padding: any valid ids)
        start:       (B,) long  position of row b's first new entry (a value below its length rewrites)
        count:       (B,) long  real entries per row, at least 1
        rows:        the state slots of these B rows, a slice of length B; None is slice(0, B)
        returns:     (B, depth, k) target ids of the k best tokens of each of the first `depth` heads, drafted
                     from position start[b]+count[b]-1; None when depth == 0 (the positions are only absorbed).
                     probs=True: (ids, (B, depth, k) float32 probabilities of those tokens), for dynamic trees
        """
        self._no_rows()

    def grow_rows(self, max_length: int) -> None:
        """Room for `max_length` committed positions per row, every row's state kept (a longer request
        joined the batch)."""
        self._no_rows()

    def skip_rows(self, slots: list[int], positions: list[int]) -> None:
        """Slot slots[i] forgets every position before positions[i]; its next draft_rows starts there. The
        engine skips a row's history when plain steps left more of it unseen than is worth catching up on;
        drafts from a shorter history may be worse, never wrong (verification decides)."""
        self._no_rows()

    def move_row(self, src: int, dst: int) -> None:
        """The state of slot `src` now lives in slot `dst` (src is free afterwards): keeps the live rows in
        slots 0..B-1."""
        self._no_rows()

    def _no_rows(self):
        raise InputError(
            f"{type(self).__name__} does not support batched decoding (implement supports_rows/reset_rows/"
            "draft_rows/move_row, see amphista.drafters.base); batch size 1 still works through generate()"
        )

    def attach(self, target) -> None:
        """Bind to a target (a `TargetModel`) and check that it fits. Called by the decoder."""
        self.check_compatible(target.vocab_size, target.hidden_size)

    def check_compatible(self, vocab_size: int, hidden_size: int) -> None:
        """Raise DrafterMismatchError unless the target's vocabulary and hidden sizes are this drafter's."""
        if self.vocab_size != vocab_size:
            raise DrafterMismatchError(
                f"the drafter was built for a vocabulary of {self.vocab_size} tokens but the target has "
                f"{vocab_size}: train or load a drafter for this target"
            )
        if self.hidden_size != hidden_size:
            raise DrafterMismatchError(
                f"the drafter was trained for hidden size {self.hidden_size} but the target has "
                f"{hidden_size}: train or load a drafter for this target"
            )
