"""What Medusa and Amphista share: building for a target, binding its frozen tables, the training
contract (features / project / forward), parameter groups and saving.

The target's embedding table and (optionally) lm_head are used, never owned: they are held outside the
module tree, so they are not parameters, not in state_dict, not saved, not moved by `.to()`, and
`attach(target)` supplies them again after loading.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DrafterMismatchError, InputError
from ..target import TargetModel
from .base import Drafter


class _TargetRef:
    """The target's modules a drafter borrows. Deep copies share them instead of copying the target."""

    def __init__(self, embed: nn.Module, lm_head: nn.Module):
        self.embed, self.lm_head = embed, lm_head

    def __deepcopy__(self, memo):
        return self


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

    # --- construction ----------------------------------------------------------------------------

    @classmethod
    def for_target(cls, target, num_heads: int | None = None, *, device=None, dtype=None, **overrides):
        """A fresh, untrained drafter for `target` (a transformers causal LM or a `TargetModel`).

        Every head starts as the target's lm_head. device/dtype default to the target's; training
        usually wants dtype=torch.float32."""
        target = TargetModel.wrap(target)
        if num_heads is not None:
            overrides["num_heads"] = num_heads
        config = cls.config_class.from_target(target, **overrides)
        device = target.device if device is None else device
        dtype = target.dtype if dtype is None else dtype
        with torch.device(device):
            drafter = cls(config)
        drafter.to(dtype)
        drafter.vocab.init_from(target.lm_head)
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

    def _borrowed(self) -> _TargetRef:
        if self._target is None:
            raise InputError(
                f"this {type(self).__name__} uses the target's frozen embedding table or lm_head, which are "
                "not saved with it: call drafter.attach(target) or load_drafter(path, target=target) first"
            )
        return self._target

    def _lm_head(self) -> nn.Module | None:
        return self._borrowed().lm_head if self.config.shared_lm_head else None

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
        """features (..., K, d) -> logits (..., K, V)."""
        return self.vocab(features, self._lm_head())

    def forward(self, hidden, next_tokens, position_ids=None) -> torch.Tensor:
        """(B, T, d), (B, T) -> logits (B, T, K, V)."""
        return self.project(self.features(hidden, next_tokens, position_ids))

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
        from .io import save_drafter

        save_drafter(self, path)


def _group_of(param_name: str) -> str:
    return "heads" if param_name.split(".")[0] in ("resblocks", "vocab") else "layers"


def built_for(target: TargetModel) -> dict:
    return {
        "architecture": target.architecture,
        "hidden_size": target.hidden_size,
        "vocab_size": target.vocab_size,
        "name_or_path": target.name_or_path,
    }
