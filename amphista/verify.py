"""Tree verification: which candidates the target accepts, and the bonus token it adds.

All three rules walk the same tree buffers and return the accepted node indices (root first) and the
bonus token sampled (or taken greedily) from the target at the last accepted node.
- greedy: exact; a node is accepted when it equals the target's argmax at its parent, all ancestors too.
- sampling: lossless. At each accepted node the target samples the next position's token itself, with
  the request's PositionSampler (a uniform keyed by seed and position), and the child drafting that token
  is accepted; none: the sample is the bonus token. Siblings are deterministic top-k candidates (one-hot
  drafts), so a candidate is accepted with probability p(candidate), as in rejection sampling, and every
  emitted token is distributed exactly as p. Because the sample at a position does not depend on the
  tree, a seed gives the same text as plain sampling.
- typical: Medusa's typical acceptance (lossy, opt-in): accept c when p(c) > min(eps, alpha * exp(-H(p))).
"""

from __future__ import annotations

import torch

from .sampling import PositionSampler, SamplingParams, sample, target_probs
from .tree import TreeBuffers


def _longest_path(ok: torch.Tensor, buf: TreeBuffers, score: torch.Tensor | None = None):
    """ok (N,) bool per node (root True) -> (accepted node indices as a list, tensor)."""
    path_ok = ok[buf.retrieve] & buf.valid  # (P, D+1)
    lengths = path_ok.long().cumprod(1).sum(1)  # (P,)
    rank = lengths
    if score is not None:
        # Among the longest paths prefer the one the target likes most (Medusa's tie-break).
        steps = torch.arange(buf.retrieve.shape[1], device=ok.device)
        in_path = steps[None, :] < lengths[:, None]
        rank = lengths * 1e6 + (score[buf.retrieve] * in_path).sum(1)
    best = rank.argmax()
    n = int(lengths[best])
    idx = buf.retrieve[best, :n]
    return idx.tolist(), idx


def verify_greedy(tokens: torch.Tensor, logits: torch.Tensor, buf: TreeBuffers):
    """tokens (N,), logits (N, V) -> (accepted node list, accepted tensor, bonus token).

    Siblings are distinct top-k tokens of one head, so at most one child of a node can equal the
    target's argmax there: walking down from the root finds the longest accepted path. Two host
    transfers and a walk over a few Python lists cost less than a dozen tensor ops at these sizes.
    """
    argmax = logits.argmax(-1).tolist()
    nodes, bonus = accepted_path(tokens.tolist(), buf.children, argmax.__getitem__)
    return nodes, torch.tensor(nodes, device=tokens.device), bonus


def accepted_path(tok: list[int], children: list[list[int]], target_token) -> tuple[list[int], int]:
    """(accepted nodes, root first; the bonus token) of a tree whose node tokens are `tok`, where
    target_token(node) is the token the target puts after that node (its argmax, or its sample). Siblings
    are distinct, so at most one child of a node matches: a walk down from the root."""
    node, nodes = 0, [0]
    while True:
        want = target_token(node)
        node = next((c for c in children[node] if tok[c] == want), None)
        if node is None:
            return nodes, want
        nodes.append(node)


def verify_sampling(
    tokens: torch.Tensor,
    logits: torch.Tensor,
    buf: TreeBuffers,
    params: SamplingParams,
    sampler: PositionSampler,
    start: int,
):
    """As verify_greedy, with the target's sample at each node (position start + depth + 1) for its argmax."""
    probs = target_probs(logits, params)  # (N, V)
    nodes, bonus = accepted_path(
        tokens.tolist(), buf.children, lambda node: sampler.draw(probs[node], start + buf.depths[node] + 1)
    )
    return nodes, torch.tensor(nodes, device=tokens.device), bonus


def verify_typical(
    tokens: torch.Tensor,
    logits: torch.Tensor,
    buf: TreeBuffers,
    params: SamplingParams,
    sampler: PositionSampler,
    start: int,
    eps: float = 0.09,
    alpha: float = 0.3,
):
    probs = target_probs(logits, params)  # (N, V)
    entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1)  # (N,)
    threshold = torch.minimum(torch.full_like(entropy, eps), alpha * torch.exp(-entropy))
    parent = buf.parent
    p_tok = probs[parent, tokens]  # (N,) probability of each node under its parent's distribution
    ok = p_tok > threshold[parent]
    ok[0] = True
    nodes, idx = _longest_path(ok, buf, score=p_tok.clamp_min(1e-20).log())
    return nodes, idx, sample(probs[nodes[-1]], sampler, start + buf.depths[nodes[-1]] + 1)
