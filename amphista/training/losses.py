"""The drafter's training loss: per head, LM loss to the data token plus alignment to the frozen target.

Conventions (docs/method.md, Training; 0-based heads): the drafter at position t reads h_t and x_{t+1}; head k
predicts x_{t+2+k}. Its LM label is the data token x_{t+2+k}; its soft label is the target's own
distribution at position t+1+k, which is the target's prediction of that same token. Per head:

    L_k = lm_weight * CE(x_{t+2+k}, q_k) + align_weight * CE(p_{t+1+k}, q_k)   (mean over labelled t)
    L   = sum_k w_k L_k,   w_k = head_decay ** k (or 1)

The alignment term is a cross-entropy, i.e. KL(p || q) plus the target's entropy, which has no gradient.

With a reduced draft vocabulary (drafter.d2t, N target ids), q is over those N tokens:
- an LM label outside them becomes -100 and adds nothing to the LM term, but its position still counts in
  the normaliser and as a miss in the top-1 statistics, so losses and accuracies stay comparable with a
  full-vocabulary drafter's (the drafter can never propose that token);
- p is the target's distribution restricted to the N tokens and renormalised over them: the log-probs
  gathered at d2t minus their logsumexp, which equals softmax of the target's logits gathered at d2t
  (log_softmax does not change under a shift), so the trainer computes only those N logits. Renormalising
  keeps the soft label a distribution, so the term is a cross-entropy between two distributions over the
  same N tokens whose minimum is q = p restricted; the target's mass on dropped tokens would otherwise
  scale each position's weight by how much of the target's mass happens to be kept. The alignment term
  applies at every labelled position, in the vocabulary or not: the target's view of the kept tokens is
  informative either way.
The loss reads the target's distribution as probabilities per position (`target_probs`), not per (position,
head): every position feeds up to K heads, and the exp and renormalisation over vocabulary-sized rows cost
Medusa on SmolLM2 more than its own projection did when done per head (2 of 5.4 s a step).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .batching import head_labels

# Elements of one (positions, K, V) logit chunk when logits_chunk is 0 (auto): 256 MiB in float32, or on the
# CPU up to AUTO_CHUNK_SHARE of the memory available to this process, where that is more. About six such
# tensors live at once (logits, log-softmax, soft labels, their product, gradients), and a chunk that holds
# the whole step is not recomputed in backward: 1.4x the steps/s of Medusa on SmolLM2 (8 x 512 positions,
# 8,192 draft tokens: 5.7 -> 4.0 s), 1.1-1.3x Amphista's.
AUTO_CHUNK_ELEMENTS = 1 << 26
AUTO_CHUNK_SHARE = 1 / 16


def auto_chunk_elements(device: torch.device) -> int:
    """Elements of an automatic logit chunk on `device`. A GPU keeps the fixed size (its memory is scarcer,
    and this was measured on a CPU only); on the CPU the processes of one machine share its memory."""
    if device.type != "cpu":
        return AUTO_CHUNK_ELEMENTS
    try:
        import psutil

        available = psutil.virtual_memory().available
    except (ImportError, OSError):
        return AUTO_CHUNK_ELEMENTS
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(AUTO_CHUNK_ELEMENTS, int(available * AUTO_CHUNK_SHARE / processes) // 4)


def target_probs(logprobs: torch.Tensor, d2t: torch.Tensor | None = None) -> torch.Tensor:
    """The frozen target's distribution as DraftLoss reads it: log-probs (..., V), or (..., N) already
    gathered at d2t (e.g. from a cache of the target's outputs) -> probabilities over V, or over the draft
    vocabulary renormalised (module docstring)."""
    if d2t is None:
        return logprobs.exp()
    kept = logprobs if logprobs.shape[-1] == d2t.numel() else logprobs[..., d2t.to(logprobs.device)]
    return torch.softmax(kept, -1)  # softmax(log p restricted) = p restricted / its sum


def head_weights(num_heads: int, weighting: str = "decay", decay: float = 0.8) -> list[float]:
    return [decay**k if weighting == "decay" else 1.0 for k in range(num_heads)]


class DraftLoss(nn.Module):
    """The drafter plus its loss in one forward, so that DDP's gradient hooks see the whole graph."""

    def __init__(self, drafter: nn.Module, weights: list[float], lm_weight=1.0, align_weight=1.0, chunk=0):
        super().__init__()
        self.drafter = drafter
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        self.lm_weight, self.align_weight, self.chunk = lm_weight, align_weight, chunk
        self._auto_elements: int | None = None  # auto_chunk_elements, read at the first step and kept

    def forward(self, hidden, input_ids, loss_mask, target_probs, norm):
        """hidden (B, T, d) the target's last hidden state; input_ids, loss_mask (B, T); target_probs
        (B, T, V), or (B, T, N) with a draft vocabulary, float32: the frozen target's distribution
        (`target_probs()`); norm (K,) labels per head in the global batch.

        Returns the loss of this micro-batch already divided by the global counts (so sums over
        micro-batches and processes give the global mean) and detached per-head sums for logging."""
        B, T, _ = hidden.shape
        K = len(self.weights)
        labels = head_labels(input_ids, loss_mask, K)  # (B, T-1, K)
        feats = self.drafter.features(hidden[:, :-1], input_ids[:, 1:])  # (B, T-1, K, D)
        # Only positions where some head has a label reach the vocabulary projection.
        rows = (labels >= 0).any(-1).flatten().nonzero().squeeze(1)  # (N,)
        feats = feats.flatten(0, 1)[rows]  # (N, K, D)
        labels = labels.flatten(0, 1)[rows]  # (N, K)
        labelled = labels >= 0
        d2t = getattr(self.drafter, "d2t", None)
        if d2t is not None:
            labels = self.drafter.draft_ids(labels)  # -100 outside the draft vocabulary
        b, t = rows // (T - 1), rows % (T - 1)
        arange = torch.arange(K, device=rows.device)
        # Row of the target's distribution for head k: position t+1+k of sequence b; past the end only
        # where the label is -100 anyway, hence the clamp.
        src = ((b * T + t + 1)[:, None] + arange).clamp(max=B * T - 1)  # (N, K)
        probs = target_probs.flatten(0, 1)  # (B*T, V or N)
        V = probs.shape[-1]
        if d2t is not None and V != d2t.numel():
            raise ValueError(
                f"target_probs has {V} columns, the draft vocabulary {d2t.numel()}: see target_probs()"
            )
        if not self.chunk and self._auto_elements is None:
            self._auto_elements = auto_chunk_elements(hidden.device)
        chunk = self.chunk or max(1, self._auto_elements // (K * V))
        sums = torch.zeros(3, K, device=hidden.device)  # lm, align, correct
        for c in range(0, max(len(rows), 1), chunk):
            part_args = (labels[c : c + chunk], labelled[c : c + chunk], src[c : c + chunk], probs)
            args = (feats[c : c + chunk], *part_args)
            if len(rows) > chunk:  # recompute the chunk's logits in backward instead of keeping them
                part = checkpoint(self._chunk_loss, *args, use_reentrant=False)
            else:
                part = self._chunk_loss(*args)
            sums = sums + part
        lm, align = sums[0], sums[1]
        loss = (self.weights * (self.lm_weight * lm + self.align_weight * align) / norm.clamp(min=1)).sum()
        stats = torch.stack([lm.detach(), align.detach(), sums[2].detach(), labelled.sum(0).float()])
        return loss, stats  # stats (4, K): lm sum, align sum, top-1 correct, label count

    def _chunk_loss(self, feats, labels, labelled, src, probs):
        """feats (n, K, D), labels (n, K) in the drafter's vocabulary (-100: none or not in it), labelled (n, K)
        where the data has a label, src (n, K) rows of probs (B*T, V) -> (3, K) sums of LM CE, alignment CE,
        top-1 hits."""
        logits = self.drafter.project(feats).float()  # (n, K, V)
        logq = F.log_softmax(logits, dim=-1)
        valid = labels >= 0
        lm = -logq.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (n, K)
        p = probs.index_select(0, src.flatten()).view(*src.shape, -1)  # (n, K, V)
        align = -(p * logq).sum(-1)  # (n, K)
        hits = (logits.argmax(-1) == labels) & valid
        zero = torch.zeros((), device=lm.device)
        return torch.stack(
            [torch.where(valid, lm, zero).sum(0), torch.where(labelled, align, zero).sum(0), hits.sum(0).float()]
        )
