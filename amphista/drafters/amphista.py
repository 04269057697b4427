"""Amphista (Li et al., NAACL 2025): SAL along time, K ResBlocks, then the heads attend to each other (AEB).

    h_t, embed(x_{t+1}) -> SAL (causal, cached) -> a_t -> K ResBlocks -> h'_1..K -> AEB (bidirectional
    over K) -> K vocabulary heads -> logits for x_{t+2} .. x_{t+1+K}

Initialised so that the untrained drafter equals the untrained Medusa one (docs/drafters.md, Initialisation): every
residual branch starts at zero and the fusion passes h_t through.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .aeb import AutoEmbeddingBlock
from .common import HeadDrafter, last_positions
from .config import AmphistaConfig
from .heads import ResBlocks, VocabProjection
from .sal import StagedAdaptation


class AmphistaDrafter(HeadDrafter):
    """The Amphista drafter: K heads that see the tokens committed so far (SAL) and each other (AEB).

    Build an untrained one for a target with `AmphistaDrafter.for_target(target, num_heads=4, **options)`
    (options are AmphistaConfig fields, e.g. `sal_stages=2, aeb_layers=1`), train it with
    `amphista.training.train`, save it with `save_pretrained(folder)` and load it back with
    `amphista.load_drafter(folder, target)`. Then `SpeculativeDecoder(target, drafter).generate(...)`.

    Args:
        config: an AmphistaConfig; `for_target` fills the target-dependent fields for you.

    The target's embedding table and lm_head are borrowed, not stored: a loaded drafter needs
    `attach(target)` (the decoder and load_drafter(path, target) do it). Before drafting a new sequence,
    call `reset(max_length)`; the decoder does this too.
    """

    drafter_type = "amphista"
    config_class = AmphistaConfig
    supports_rows = True

    def __init__(self, config: AmphistaConfig):
        super().__init__(config)
        c = config
        self.sal = StagedAdaptation(c) if c.use_sal else None
        self.resblocks = ResBlocks(c.num_heads, c.hidden_size, c.resblock_layers)
        self.aeb = AutoEmbeddingBlock(c) if c.aeb_layers > 0 else None
        self.vocab = VocabProjection.from_config(c)
        # split variant: (stage, number of heads) runs, near heads first; None when all heads read one output.
        # Plain ints, not an index tensor: nothing to move between devices or out of inference mode.
        stages = c.head_stages() if c.use_sal and c.sal_variant == "split" else None
        self._stage_runs = None if stages is None else [(s, stages.count(s)) for s in sorted(set(stages))]
        self._prepared = False  # reset() gathers the drafting weights
        self._rows_prepared = False  # reset_rows() does, for batched drafting

    def features(self, hidden, next_tokens, position_ids=None) -> torch.Tensor:
        h = hidden.to(self.dtype)  # (B, T, d)
        a = h if self.sal is None else self.sal(h, self._embed(next_tokens), position_ids)
        return self._heads(a)

    def _heads(self, a: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """a (B, T, d), or (B, T, S, d) per SAL stage for the split variant -> (B, T, K, d)."""
        per_head = self._stage_runs is not None
        if per_head:
            *lead, _, d = a.shape
            a = torch.cat([a[..., s : s + 1, :].expand(*lead, n, d) for s, n in self._stage_runs], dim=-2)  # (B,T,K,d)
        x = self.resblocks(a, per_head=per_head)  # (B, T, K, d)
        if self.aeb is not None:
            x = self.aeb(x.reshape(-1, *x.shape[-2:]), decode).view(x.shape)  # (B*T, K, d): a group per position
        return x

    @torch.inference_mode()
    def reset(self, max_length: int) -> None:
        if self.sal is not None:
            self.sal.reset(max_length, self.device, self.dtype)
        if self.aeb is not None:
            self.aeb.prepare_decode()
        self._prepared = True

    def _apply(self, fn, recurse=True):
        # Moving or casting replaces the parameters, and the drafting weights gathered at reset are views of
        # the old ones: drafting needs a reset (or reset_rows) again.
        self._prepared = self._rows_prepared = False
        for part in (self.sal, self.aeb):
            if part is not None:
                part.decode_weights = None
        return super()._apply(fn, recurse)

    def _draft_logits(self, hidden, next_tokens, start_pos, depth=None):
        """hidden (1, n, d), next_tokens (1, n): the newly committed positions -> (depth, N) for the last one."""
        if not self._prepared:
            raise InputError(
                "the drafter was not reset for this sequence (or was moved or cast since): call "
                "drafter.reset(max_length) before the first draft of every sequence"
            )
        dtype = self.dtype
        h = hidden if hidden.dtype == dtype else hidden.to(dtype)
        if self.sal is None:
            a = h[:, -1:]
        else:
            a = self.sal.step(h, self._embed(next_tokens), start_pos)  # (1, 1, [S,] d)
        # Every head's features (the AEB mixes them), but only the first depth heads' vocabulary logits.
        x = self._heads(a, decode=True).view(self.num_heads, -1)  # (K, d)
        return self.project(x if depth is None else x[:depth])  # (depth, N)

    @torch.inference_mode()
    def reset_rows(self, capacity: int, max_length: int) -> None:
        if self.sal is not None:
            self.sal.reset_rows(capacity, max_length, self.device, self.dtype)
        if self.aeb is not None:
            self.aeb.prepare_decode()
        self._rows_prepared = True

    @torch.inference_mode()
    def grow_rows(self, max_length: int) -> None:
        if self.sal is not None:
            self.sal.grow_rows(max_length, self.device, self.dtype)

    @torch.inference_mode()
    def skip_rows(self, slots: list[int], positions: list[int]) -> None:
        if self.sal is not None:
            self.sal.skip_rows(slots, positions)

    @torch.inference_mode()
    def move_row(self, src: int, dst: int) -> None:
        if self.sal is not None:
            self.sal.move_row(src, dst)

    def _draft_rows_logits(self, hidden, next_tokens, start, count, depth, rows=None):
        if not self._rows_prepared:
            raise InputError(
                "the drafter was not reset for batched drafting (or was moved or cast since): call "
                "drafter.reset_rows(capacity, max_length) before the first draft_rows of every batch"
            )
        dtype = self.dtype
        h = hidden if hidden.dtype == dtype else hidden.to(dtype)
        if self.sal is not None:
            rows = slice(0, h.shape[0]) if rows is None else rows
            a = self.sal.step_rows(h, self._embed(next_tokens), start, count, rows)  # (B, [S,] d)
        if depth == 0:
            return None
        if self.sal is None:
            a = last_positions(h, count)  # (B, d)
        return self.project(self._heads(a, decode=True)[:, :depth])  # (B, depth, N)

    @property
    def keeps_state(self) -> bool:
        """Only SAL keeps what was drafted from; without it a draft reads the last hidden state only."""
        return self.sal is not None

    @property
    def cache_length(self) -> int:
        """Committed positions in the SAL cache (0 without SAL)."""
        return 0 if self.sal is None else self.sal.length
