"""What Medusa and Amphista share: building for a target, binding its frozen tables, the training
contract (features / project / forward), parameter groups and saving.

The target's embedding table and (optionally) lm_head are used, never owned: they are held outside the
module tree, so they are not parameters, not in state_dict, not saved, not moved by `.to()`, and
`attach(target)` supplies them again after loading.

A drafter with a reduced draft vocabulary (config.draft_vocab_size = N > 0) predicts over N tokens; its
`d2t` buffer (saved) holds their target ids. `project` and `forward` give draft-space logits (..., K, N);
`draft` gives target-space ones and `draft_topk` target ids, so the decoder never sees draft ids.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DrafterMismatchError, InputError
from ..target import TargetModel
from .base import Drafter
from .saving import save_drafter
from .vocab import check_d2t


class _TargetRef:
    """The target's modules a drafter borrows. Deep copies share them instead of copying the target."""

    def __init__(self, embed: nn.Module, lm_head: nn.Module):
        self.embed, self.lm_head = embed, lm_head

    def __deepcopy__(self, memo):
        return self


class _HeadRows:
    """The shared lm_head's rows for the draft vocabulary, in the shape VocabProjection reads."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias


class HeadDrafter(Drafter):
    drafter_type: str = ""
    config_class: type = object

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self.built_for: dict = {"hidden_size": config.hidden_size, "vocab_size": config.vocab_size}
        self._target: _TargetRef | None = None
        n = config.draft_vocab_size
        # A None buffer stays out of state_dict, so full-vocabulary checkpoints keep their exact layout.
        # The placeholder ids are replaced by for_target or by the loaded weights.
        self.register_buffer("d2t", torch.arange(n) if n else None)
        # Tables derived from d2t and the target (the shared head's rows, the target -> draft id map), built
        # on first use and dropped whenever d2t, the device or the target may have changed.
        self._vocab_cache: dict = {}
        self.register_load_state_dict_post_hook(_forget_vocab_tables)

    # --- construction ----------------------------------------------------------------------------

    @classmethod
    def for_target(
        cls, target, num_heads: int | None = None, *, device=None, dtype=None, d2t=None, **overrides
    ):
        """A fresh, untrained drafter for `target` (a transformers causal LM or a `TargetModel`).

        Every head starts as the target's lm_head. device/dtype default to the target's; training
        usually wants dtype=torch.float32. `d2t` (target ids, e.g. from
        `amphista.drafters.vocab.draft_vocab_from_tokens`) gives the drafter a reduced draft vocabulary of
        len(d2t) tokens; draft_vocab_size is then taken from it."""
        target = TargetModel.wrap(target)
        if num_heads is not None:
            overrides["num_heads"] = num_heads
        if d2t is not None:
            d2t = torch.as_tensor(d2t).flatten()
            if d2t.dtype != torch.long and not d2t.dtype.is_floating_point:
                d2t = d2t.long()
            size = overrides.setdefault("draft_vocab_size", d2t.numel())
            if size != d2t.numel():
                raise InputError(
                    f"draft_vocab_size={size!r} but d2t holds {d2t.numel()} token ids: pass one of them, or both equal"
                )
        elif overrides.get("draft_vocab_size"):
            raise InputError(
                f"draft_vocab_size={overrides['draft_vocab_size']!r} needs the kept tokens: pass "
                "d2t=amphista.drafters.vocab.draft_vocab_from_tokens(token_id_lists, n, target.vocab_size, "
                "target.eos_token_ids()), or train with --set draft_vocab_size=N, which counts the training data"
            )
        config = cls.config_class.from_target(target, **overrides)
        if d2t is not None:
            check_d2t(d2t, config.draft_vocab_size, target.vocab_size)
        device = target.device if device is None else device
        dtype = target.dtype if dtype is None else dtype
        with torch.device(device):
            drafter = cls(config)
        drafter.to(dtype)
        if d2t is not None:
            drafter.d2t.copy_(d2t)
        drafter.vocab.init_from(target.lm_head, drafter.d2t)
        drafter.built_for = built_for(target)
        drafter.attach(target)
        return drafter

    def attach(self, target) -> None:
        """Bind to `target`: check it is the kind of model this drafter was built for and borrow its
        embedding table and lm_head."""
        target = TargetModel.wrap(target)
        self.check_compatible(target.vocab_size, target.hidden_size)
        mine, theirs = self.built_for.get("architecture"), target.architecture
        if mine and theirs and mine != theirs:
            raise DrafterMismatchError(
                f"the drafter was built for a {mine} target but this target is a {theirs}: "
                "train or load a drafter for this target"
            )
        self._target = _TargetRef(target.embed_tokens, target.lm_head)
        self._vocab_cache.clear()

    def _borrowed(self) -> _TargetRef:
        if self._target is None:
            raise InputError(
                f"this {type(self).__name__} uses the target's frozen embedding table or lm_head, which are "
                "not saved with it: call drafter.attach(target) or load_drafter(path, target=target) first"
            )
        return self._target

    def _lm_head(self) -> nn.Module | _HeadRows | None:
        if not self.config.shared_lm_head:
            return None
        head = self._borrowed().lm_head
        if self.d2t is None:
            return head
        rows = self._vocab_cache.get("rows")
        dtype = self.dtype
        if rows is None or rows.weight.device != head.weight.device or rows.weight.dtype != dtype:
            # A copy of N rows, made once per attach / load / move / cast: gathering them at every call would
            # copy N x d weights per draft step. In the drafter's dtype: a bfloat16 drafter reads half the
            # bytes (drafting runs at memory speed). Built outside inference mode so that training can use it.
            with torch.inference_mode(False), torch.no_grad():
                index = self.d2t.to(head.weight.device)
                bias = getattr(head, "bias", None)
                rows = _HeadRows(head.weight[index].to(dtype), None if bias is None else bias[index].to(dtype))
            self._vocab_cache["rows"] = rows
        return rows

    # --- draft vocabulary ------------------------------------------------------------------------

    def draft_ids(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Target ids (any shape; negative = no label) -> draft ids, -100 where the id is not in the draft
        vocabulary (or has no label). The identity without a draft vocabulary."""
        if self.d2t is None:
            return target_ids
        t2d = self._vocab_cache.get("t2d")
        if t2d is None or t2d.device != self.d2t.device:
            with torch.inference_mode(False), torch.no_grad():
                t2d = torch.full((self.vocab_size,), -100, dtype=torch.long, device=self.d2t.device)
                t2d[self.d2t] = torch.arange(self.d2t.numel(), device=self.d2t.device)
            self._vocab_cache["t2d"] = t2d
        ids = target_ids.to(t2d.device)
        return t2d[ids.clamp(min=0)].masked_fill(ids < 0, -100)

    def target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids (any shape, all valid) -> the target's ids. The identity without a draft vocabulary."""
        return draft_ids if self.d2t is None else self.d2t[draft_ids]

    # --- drafting --------------------------------------------------------------------------------

    def _draft_logits(self, hidden, next_tokens, start_pos, depth: int | None = None) -> torch.Tensor:
        """Append the newly committed positions; (depth, N) draft-space logits of the first `depth` heads
        (None: all K) for the last one."""
        raise NotImplementedError

    def _draft_rows_logits(self, hidden, next_tokens, start, count, depth: int, rows: slice | None = None):
        """draft_rows's work: (B, depth, N) draft-space logits for each row's last real position, None when
        depth == 0."""
        raise NotImplementedError

    @torch.inference_mode()
    def draft(self, hidden, next_tokens, start_pos):
        """hidden (1, n, d), next_tokens (1, n): the newly committed positions -> (K, V) target-space logits
        for the last one; tokens outside a draft vocabulary get -inf. `draft_topk` is cheaper with one."""
        logits = self._draft_logits(hidden, next_tokens, start_pos)
        if self.d2t is None:
            return logits
        full = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        return full.index_copy_(1, self.d2t, logits)

    @torch.inference_mode()
    def draft_topk(self, hidden, next_tokens, start_pos, depth: int, k: int) -> torch.Tensor:
        """As `draft`, but returns the target ids of the k best tokens of the first `depth` heads, (depth, k):
        the top-k is taken over the draft vocabulary and only its winners are mapped to target ids."""
        return self._top_ids(self._draft_logits(hidden, next_tokens, start_pos, depth), k)

    @torch.inference_mode()
    def draft_topk_probs(self, hidden, next_tokens, start_pos, depth: int, k: int):
        """See Drafter.draft_topk_probs; the softmax and top-k are over the draft vocabulary."""
        return self._top_probs(self._draft_logits(hidden, next_tokens, start_pos, depth), k)

    @torch.inference_mode()
    def draft_rows(
        self, hidden, next_tokens, start, count, depth: int, k: int, rows: slice | None = None, probs: bool = False
    ):
        """See Drafter.draft_rows; as in draft_topk, the top-k is taken over the draft vocabulary."""
        logits = self._draft_rows_logits(hidden, next_tokens, start, count, depth, rows)
        if logits is None:
            return None
        return self._top_probs(logits, k) if probs else self._top_ids(logits, k)

    def _top_ids(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """(..., N) draft-space logits -> (..., k) target ids of the k best."""
        self._check_k(logits, k)
        return self.target_ids(torch.topk(logits, k, dim=-1).indices)

    def _top_probs(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As `_top_ids`, with their float32 probabilities (softmax over the draft vocabulary)."""
        self._check_k(logits, k)
        top = torch.topk(logits.float().softmax(-1), k, dim=-1)
        return self.target_ids(top.indices), top.values

    @staticmethod
    def _check_k(logits: torch.Tensor, k: int) -> None:
        if k > logits.shape[-1]:
            raise InputError(
                f"the tree asks for rank {k - 1} but the drafter's draft vocabulary has {logits.shape[-1]} "
                "tokens: use a narrower tree or a drafter with a larger draft_vocab_size"
            )

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> (B, T, d) in the drafter's dtype."""
        e = self._borrowed().embed(tokens)
        return e if e.dtype == self.dtype else e.to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.resblocks.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.resblocks.weight.device

    # --- training contract -----------------------------------------------------------------------

    def features(self, hidden, next_tokens, position_ids=None) -> torch.Tensor:
        """hidden (B, T, d), next_tokens (B, T), position_ids (B, T) or None -> (B, T, K, d) pre-vocabulary
        features. Row [b, t, k] predicts the token at position t+2+k."""
        raise NotImplementedError

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """features (..., K, d) -> logits (..., K, V), over the draft vocabulary when there is one (map
        indices back with `target_ids`). features[..., :D, :] gives the first D heads' logits only."""
        return self.vocab(features, self._lm_head())

    def forward(self, hidden, next_tokens, position_ids=None) -> torch.Tensor:
        """(B, T, d), (B, T) -> logits (B, T, K, V), over the draft vocabulary when there is one."""
        return self.project(self.features(hidden, next_tokens, position_ids))

    def _apply(self, fn, recurse=True):
        # A move or cast may put d2t elsewhere than the tables derived from it.
        self._vocab_cache.clear()
        return super()._apply(fn, recurse)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything this drafter trains; the borrowed embedding and lm_head are not among them."""
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, head_lr: float | None = None, layer_lr: float | None = None) -> list[dict]:
        """Optimizer groups: 'heads' (ResBlocks, vocabulary heads) and 'layers' (SAL and AEB transformer
        layers, fusion, position embedding), which may want a lower learning rate."""
        groups = []
        for name, lr in (("heads", head_lr), ("layers", layer_lr)):
            params = [p for n, p in self.named_parameters() if p.requires_grad and _group_of(n) == name]
            if params:
                groups.append({"name": name, "params": params, **({"lr": lr} if lr is not None else {})})
        return groups

    def save_pretrained(self, path) -> None:
        """Write config.json, model.safetensors and README.md (only when absent or an unedited card of ours)
        into the folder `path`, each file atomically; every other file and subfolder there is kept."""
        save_drafter(self, path)


def last_positions(x: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """x (B, n, ...), count (B,) -> (B, ...): each row's last real (left-aligned) entry, x[b, count[b] - 1]."""
    return x[torch.arange(x.shape[0], device=x.device), count - 1]


def _forget_vocab_tables(module, incompatible_keys) -> None:
    module._vocab_cache.clear()  # the loaded d2t may name other tokens


def _group_of(param_name: str) -> str:
    return "heads" if param_name.split(".")[0] in ("resblocks", "vocab") else "layers"


def built_for(target: TargetModel) -> dict:
    return {
        "architecture": target.architecture,
        "hidden_size": target.hidden_size,
        "vocab_size": target.vocab_size,
        "name_or_path": target.name_or_path,
    }
