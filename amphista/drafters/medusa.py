"""Medusa (Cai et al. 2024): K blind heads on the target's last hidden state, the baseline Amphista extends."""

from __future__ import annotations

import torch

from .common import HeadDrafter
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
    config_class = MedusaConfig

    def __init__(self, config: MedusaConfig):
        super().__init__(config)
        c = config
        self.resblocks = ResBlocks(c.num_heads, c.hidden_size, c.num_layers)
        self.vocab = VocabProjection.from_config(c)

    def features(self, hidden, next_tokens=None, position_ids=None) -> torch.Tensor:
        """(B, T, d) -> (B, T, K, d); Medusa reads neither the sampled token nor positions."""
        return self.resblocks(hidden.to(self.dtype))

    def _draft_logits(self, hidden, next_tokens, start_pos):
        """hidden (1, n, d) -> (K, N) from the last position; Medusa keeps no state across steps."""
        return self.project(self.resblocks(hidden[0, -1].to(self.dtype)))
