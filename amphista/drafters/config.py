"""Drafter configurations. Every ablation of the paper is a field here, never a code fork.

A config holds everything needed to rebuild the modules (it is saved as config.json next to the
weights); `from_target` fills the target-dependent fields from a `TargetModel`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import InputError

POSITION_EMBEDDINGS = ("learned", "sinusoidal", "rotary", "none")
# refuse:     stage s > 1 reads stage s-1's output re-fused with the sampled-token embedding (default)
# token_once: the token embedding enters at stage 1 only
# split:      stage 1 feeds the near heads, the last stage the far heads
SAL_VARIANTS = ("refuse", "token_once", "split")


def _target_shape(target) -> dict:
    """What a drafter copies from the target's text config (a `TargetModel`)."""
    tc = target.text_config
    d = target.hidden_size
    heads = int(getattr(tc, "num_attention_heads", 0) or 0)
    head_dim = getattr(tc, "head_dim", None) or (d // heads if heads else 64)
    rope = getattr(tc, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return {
        "hidden_size": d,
        "vocab_size": target.vocab_size,
        "intermediate_size": int(getattr(tc, "intermediate_size", 0) or 0) or None,
        "head_dim": int(head_dim),
        "rope_theta": float(theta or getattr(tc, "rope_theta", None) or 10000.0),
        "rms_norm_eps": float(getattr(tc, "rms_norm_eps", None) or 1e-6),
        "head_bias": getattr(target.lm_head, "bias", None) is not None,
    }


class _Config:
    """Shared dict round trip and checks."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(
                f"unknown {cls.__name__} fields {unknown}: the config was written by another version of amphista"
            )
        return cls(**data)

    @classmethod
    def from_target(cls, target, **overrides):
        shape = _target_shape(target)
        kept = {k: v for k, v in shape.items() if k in {f.name for f in fields(cls)}}
        bad = sorted(set(overrides) - {f.name for f in fields(cls)})
        if bad:
            raise InputError(f"unknown {cls.__name__} options {bad}: see docs/drafters.md for the knobs")
        return cls(**{**kept, **overrides})

    def _check_common(self) -> None:
        if self.hidden_size < 1 or self.vocab_size < 1:
            raise InputError(
                "hidden_size and vocab_size must be positive: build the config with from_target()"
            )
        if self.num_heads < 1:
            raise InputError(f"num_heads must be at least 1, got {self.num_heads}")
        n = self.draft_vocab_size
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < self.vocab_size:
            raise InputError(
                f"draft_vocab_size must be 0 (the full vocabulary) or an integer below the target's "
                f"{self.vocab_size} tokens, got {n!r}"
            )

    @property
    def head_vocab_size(self) -> int:
        """Rows of each vocabulary head: the draft vocabulary's size, or the target's."""
        return self.draft_vocab_size or self.vocab_size


@dataclass
class MedusaConfig(_Config):
    """Everything needed to build a MedusaDrafter; saved as config.json next to its weights.

    Build it with `MedusaConfig.from_target(target, num_heads=4, ...)`, which copies hidden_size,
    vocab_size, head_bias and rms_norm_eps from the target, or let `MedusaDrafter.for_target` do it.

    Args:
        hidden_size: the target's hidden size.
        vocab_size: the target's vocabulary size.
        num_heads: tokens drafted ahead, one head each. Default 4.
        num_layers: ResBlocks per head (none shared). Default 1.
        shared_lm_head: True: every head ends in the target's frozen lm_head instead of its own trained
            copy (far fewer parameters). Default False.
        head_norm: an RMSNorm before the shared lm_head (ignored with separate heads). Default True.
        head_bias: the target's lm_head has a bias, copied into separate heads. Default False.
        rms_norm_eps: epsilon of the RMSNorms. Default 1e-6.
        draft_vocab_size: N > 0: the heads predict over the N most frequent tokens of the training data
            (their target ids are saved as the drafter's `d2t` buffer) instead of the whole vocabulary, which
            makes the heads V/N times cheaper. Default 0: the full vocabulary.
    """

    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1  # ResBlocks per head, none shared
    shared_lm_head: bool = False  # True: the target's frozen lm_head instead of K trained copies
    head_norm: bool = True  # RMSNorm before the shared lm_head (ignored for separate heads)
    head_bias: bool = False  # the target's lm_head has a bias (copied into separate heads)
    rms_norm_eps: float = 1e-6
    draft_vocab_size: int = 0  # N > 0: heads over the N most frequent training tokens (d2t maps them back)

    def __post_init__(self):
        self._check_common()
        if self.num_layers < 1:
            raise InputError(f"num_layers must be at least 1, got {self.num_layers}")


@dataclass
class AmphistaConfig(_Config):
    """Everything needed to build an AmphistaDrafter, every ablation of the paper included; saved as
    config.json next to its weights.

    Build it with `AmphistaConfig.from_target(target, num_heads=4, ...)`, which copies the target-dependent
    fields (hidden_size, vocab_size, intermediate_size, head_dim, rope_theta, rms_norm_eps, head_bias), or
    let `AmphistaDrafter.for_target` do it. docs/drafters.md discusses the knobs.

    Args:
        hidden_size: the target's hidden size.
        vocab_size: the target's vocabulary size.
        num_heads: tokens drafted ahead, one head each. Default 4.
        resblock_layers: ResBlocks per head. Default 1.
        use_sal: the Staged Adaptation Layers, causal attention over the committed tokens; False gives
            Medusa plus the AEB. Default True.
        sal_stages: SAL layers. Default 2.
        sal_variant: how the sampled token's embedding enters the stages: "refuse" (default, re-fused at
            every stage), "token_once" (first stage only) or "split" (the first stage feeds the near heads,
            the last the far heads).
        aeb_layers: Auto-embedding Block layers, where the heads attend to each other; 0 drops the AEB
            (Medusa plus SAL). Default 1.
        position_embedding: positions inside the SAL: "learned" (default), "sinusoidal", "rotary" or
            "none".
        shared_lm_head: True: every head ends in the target's frozen lm_head instead of its own trained
            copy. Default False.
        head_norm: an RMSNorm before the shared lm_head (ignored with separate heads). Default True.
        head_bias: the target's lm_head has a bias, copied into separate heads. Default False.
        sal_width: width of the SAL layers; None (default) is hidden_size, smaller widths add in/out
            projections.
        aeb_width: width of the AEB layers, as sal_width. Default None.
        intermediate_size: the SwiGLU size at full width, scaled down with the widths. Default None: 8/3
            of hidden_size rounded up to 32 (from_target copies the target's).
        head_dim: attention head size. Default None: 64, or the largest of 32/16/8 dividing both widths
            (from_target copies the target's).
        rope_theta: rotary base, for position_embedding="rotary" (from_target copies the target's).
            Default 10000.0.
        rms_norm_eps: epsilon of the RMSNorms. Default 1e-6.
        draft_vocab_size: N > 0: the heads predict over the N most frequent tokens of the training data
            (their target ids are saved as the drafter's `d2t` buffer) instead of the whole vocabulary, which
            makes the heads V/N times cheaper. Default 0: the full vocabulary.
    """

    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    resblock_layers: int = 1
    use_sal: bool = True  # False: the ResBlocks read h_t directly (Medusa + AEB)
    sal_stages: int = 2
    sal_variant: str = "refuse"
    aeb_layers: int = 1  # 0: no Auto-embedding Block (Medusa + SAL)
    position_embedding: str = "learned"
    shared_lm_head: bool = False
    head_norm: bool = True
    head_bias: bool = False
    sal_width: int | None = None  # None: hidden_size; smaller widths add in/out projections
    aeb_width: int | None = None
    intermediate_size: int | None = None  # SwiGLU size at full width; scaled with the widths
    head_dim: int | None = None  # None: 64, or the largest of 32/16/8 dividing both widths
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    draft_vocab_size: int = 0  # N > 0: heads over the N most frequent training tokens (d2t maps them back)

    def __post_init__(self):
        self._check_common()
        d = self.hidden_size
        self.sal_width = int(self.sal_width or d)
        self.aeb_width = int(self.aeb_width or d)
        if self.head_dim is None:
            fits = [h for h in (64, 32, 16, 8) if self.sal_width % h == 0 and self.aeb_width % h == 0]
            self.head_dim = fits[0] if fits else min(self.sal_width, self.aeb_width)
        if self.intermediate_size is None:
            self.intermediate_size = -(-8 * d // 3 // 32) * 32  # Llama's 8/3 ratio, rounded up to 32
        if self.sal_variant not in SAL_VARIANTS:
            raise InputError(f"sal_variant must be one of {SAL_VARIANTS}, got {self.sal_variant!r}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise InputError(
                f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}"
            )
        if self.sal_stages < 1 or self.aeb_layers < 0 or self.resblock_layers < 1:
            raise InputError("sal_stages and resblock_layers must be at least 1 and aeb_layers at least 0")
        if self.sal_variant == "split" and self.sal_stages > self.num_heads:
            raise InputError(
                f"sal_variant='split' gives each SAL stage a group of heads: {self.sal_stages} stages need "
                f"at least as many heads, got {self.num_heads}"
            )
        for name in ("sal_width", "aeb_width"):
            w = getattr(self, name)
            if w < 1 or w % self.head_dim:
                raise InputError(
                    f"{name}={w} must be a positive multiple of head_dim={self.head_dim}: pick another width "
                    "or set head_dim"
                )
        if self.position_embedding == "rotary" and self.head_dim % 2:
            raise InputError(f"rotary position embedding needs an even head_dim, got {self.head_dim}")

    def ffn_size(self, width: int) -> int:
        """SwiGLU size for a layer of this width: the target's FFN ratio, kept at smaller widths."""
        return max(1, self.intermediate_size * width // self.hidden_size)

    def head_stages(self) -> list[int]:
        """The SAL stage whose output each head reads (all the last stage unless sal_variant='split')."""
        if self.sal_variant != "split":
            return [self.sal_stages - 1] * self.num_heads
        return [k * self.sal_stages // self.num_heads for k in range(self.num_heads)]
