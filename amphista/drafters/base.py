"""The drafter interface the decode loop speaks.

A drafter reads the target's last hidden state h_t (post final norm) and the token x_{t+1} the target
committed after it, and returns K rows of logits: row k (0-based) predicts token t+2+k, i.e. the
(k+1)-th token after x_{t+1}. The loop never asks which drafter it has.

Incremental use, one sequence at a time:
    drafter.reset(max_length)                       # new sequence, caches for up to max_length positions
    logits = drafter.draft(hidden, next_tokens, start_pos)   # prefill: all prompt positions
    ...verify, commit m+1 tokens...
    logits = drafter.draft(hidden_new, next_new, start_pos)  # exactly the newly committed positions
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DrafterMismatchError


class Drafter(nn.Module):
    """What SpeculativeDecoder needs from a drafter; subclass it to plug in your own.

    Subclasses set `num_heads` (K, the number of tokens drafted ahead), `hidden_size` and `vocab_size` (the
    target's), and implement `draft`; `reset` and `attach` have working defaults. The contract is in this
    module's docstring. AmphistaDrafter and MedusaDrafter are the trained ones; amphista.drafters also has
    OracleDrafter and RandomDrafter for tests.
    """

    num_heads: int
    hidden_size: int
    vocab_size: int

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
