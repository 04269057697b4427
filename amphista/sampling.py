"""Turning target logits into the distribution p that both vanilla and speculative sampling draw from."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn from the target's logits; checked once, when a request is built.

    temperature: 0 decodes greedily (argmax), > 0 divides the logits before the softmax.
    top_p: nucleus sampling, keep the most likely tokens until their mass reaches top_p, in (0, 1].
    top_k: keep the top_k most likely tokens; 0 turns it off.
    """

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def __post_init__(self):
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InputError(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise InputError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        object.__setattr__(self, "top_k", int(self.top_k))
        if not (self.temperature >= 0.0):
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (..., V) -> probabilities (..., V) after temperature, top-k and top-p (in that order)."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p; the best token always stays.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


_MASK64 = (1 << 64) - 1


def _mix(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): a well-spread 64-bit seed per position, whatever the request seed."""
    z = (seed + 0x9E3779B97F4A7C15 * (position + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class PositionSampler:
    """Draws the token at sequence position t from p by inverting p's CDF at a uniform that depends only on
    (seed, t).

    Plain decoding samples position t with u_t; speculative verification samples each tree node's
    successor with the u of the position that successor would take, and accepts the child that equals the
    sample (a drafted token is accepted with probability p(token), exactly as rejection sampling with
    one-hot drafts would, and each emitted token is p-distributed with a fresh u). So for a given seed the
    output is the same token for token whatever the tree, the batch or the decoder: `tree="auto"` may
    change trees between steps and a server may batch a request with any others, and a seed still
    reproduces the text of plain sampling."""

    def __init__(self, seed: int):
        self.seed = seed % (1 << 64)
        self._generator = torch.Generator()

    def uniform(self, position: int) -> float:
        self._generator.manual_seed(_mix(self.seed, position))
        return float(torch.rand((), generator=self._generator, dtype=torch.float64))

    def draw(self, probs: torch.Tensor, position: int) -> int:
        """The token at `position` from probs (V,): the first token whose CDF exceeds u * total."""
        cdf = probs.double().cumsum(-1)
        return _on_support(probs, int(torch.searchsorted(cdf, self.uniform(position) * cdf[-1], right=True)))


def sample(probs: torch.Tensor, sampler: PositionSampler, position: int) -> int:
    return sampler.draw(probs, position)


def sample_rows(logits: torch.Tensor, params: SamplingParams, samplers: list, positions: list[int]):
    """Row i's token (a list of R) from logits (R, V) with samplers[i] at positions[i]: the tokens `draw` gives
    row by row (the same distribution per row, the same uniforms, the same CDF inversion), with the
    distributions, CDFs and searches done for all rows at once, as plain batched steps need."""
    probs = target_probs(logits, params)  # (R, V)
    cdf = probs.double().cumsum(-1)
    u = [s.uniform(p) for s, p in zip(samplers, positions)]
    u = torch.tensor(u, dtype=torch.float64, device=cdf.device)
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    tokens = index.tolist()
    V = probs.shape[-1]
    on = (index < V) & (probs.gather(1, index.clamp(max=V - 1)[:, None])[:, 0] > 0)
    for i in (~on).nonzero()[:, 0].tolist():  # rare: rounded onto a CDF's last step
        tokens[i] = _on_support(probs[i], tokens[i])
    return tokens


def _on_support(probs: torch.Tensor, index: int) -> int:
    """The CDF search's index into probs (V,), or, where u * total rounded onto the last step, its token."""
    if index >= probs.shape[-1] or probs[index] <= 0:
        return int(torch.nonzero(probs > 0)[-1])
    return index
