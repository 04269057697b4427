"""Medusa (Cai et al. 2024): K blind heads on the target's last hidden state, the baseline Amphista extends."""

from __future__ import annotations

import torch

from .common import HeadDrafter, last_positions
from .config import MedusaConfig
from .heads import ResBlocks, VocabProjection


class MedusaDrafter(HeadDrafter):
    """The Medusa drafter: K independent heads, each a stack of ResBlocks and a vocabulary head, on the
    target's last hidden state. The baseline Amphista is measured against.

    Build an untrained one with `MedusaDrafter.for_target(target, num_heads=4, **options)` (options are
    MedusaConfig fields, e.g. `num_layers=1, shared_lm_head=False`), train it with `amphista.training.train`,
    save it with `save_pretrained(folder)` and load it back with `amphista.load_drafter(folder, target)`.

    Args:
        config: a MedusaConfig; `for_target` fills the target-dependent fields for you.
    """

    drafter_type = "medusa"
    keeps_state = False  # every draft reads the last hidden state only
    config_class = MedusaConfig
    supports_rows = True

    def __init__(self, config: MedusaConfig):
        super().__init__(config)
        c = config
        self.resblocks = ResBlocks(c.num_heads, c.hidden_size, c.num_layers)
        self.vocab = VocabProjection.from_config(c)

    def features(self, hidden, next_tokens=None, position_ids=None) -> torch.Tensor:
        """(B, T, d) -> (B, T, K, d); Medusa reads neither the sampled token nor positions."""
        return self.resblocks(hidden.to(self.dtype))

    def _draft_logits(self, hidden, next_tokens, start_pos, depth=None):
        """hidden (1, n, d) -> (depth, N) from the last position; Medusa keeps no state across steps."""
        x = self.resblocks(hidden[0, -1].to(self.dtype))  # (K, d)
        return self.project(x if depth is None else x[:depth])  # draft() skips the view: ~5% of a Medusa call

    def reset_rows(self, capacity: int, max_length: int) -> None:
        """Nothing to forget: Medusa keeps no state."""

    def grow_rows(self, max_length: int) -> None:
        """Nothing to grow: Medusa keeps no state."""

    def skip_rows(self, slots: list[int], positions: list[int]) -> None:
        """Nothing to forget: Medusa keeps no state."""

    def move_row(self, src: int, dst: int) -> None:
        """Nothing to move: Medusa keeps no state."""

    def _draft_rows_logits(self, hidden, next_tokens, start, count, depth, rows=None):
        if depth == 0:
            return None
        return self.project(self.resblocks(last_positions(hidden, count).to(self.dtype))[:, :depth])
