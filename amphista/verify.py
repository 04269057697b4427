"""Tree verification: which candidates the target accepts, and the bonus token it adds.

All three rules walk the same tree buffers and return the accepted node indices (root first) and the
bonus token sampled (or taken greedily) from the target at the last accepted node.
- greedy: exact; a node is accepted when it equals the target's argmax at its parent, all ancestors too.
- sampling: lossless tree rejection sampling. Siblings are deterministic top-k candidates, i.e. drafts
  with a one-hot q, so candidate c is accepted with probability p(c); on rejection p loses c and is
  renormalised (the residual max(p - q, 0)), and the next sibling is tried. The token finally emitted
  at each depth is therefore distributed exactly as p.
- typical: Medusa's typical acceptance (lossy, opt-in): accept c when p(c) > min(eps, alpha * exp(-H(p))).
"""

from __future__ import annotations

import torch

from .sampling import SamplingParams, sample, target_probs
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
    nodes = greedy_path(tokens.tolist(), argmax, buf.children)
    idx = torch.tensor(nodes, device=tokens.device)
    return nodes, idx, argmax[nodes[-1]]


def greedy_path(tok: list[int], argmax: list[int], children: list[list[int]]) -> list[int]:
    """The accepted nodes (root first) of a tree whose node tokens are `tok`, given the target's argmax at
    every node: at most one child per node can match, so it is a walk down from the root."""
    node, nodes = 0, [0]
    while True:
        want = argmax[node]
        node = next((c for c in children[node] if tok[c] == want), None)
        if node is None:
            return nodes
        nodes.append(node)


def verify_sampling(
    tokens: torch.Tensor, logits: torch.Tensor, buf: TreeBuffers, params: SamplingParams, generator
):
    probs = target_probs(logits, params)  # (N, V)
    tok = tokens.tolist()
    node, nodes = 0, [0]
    while True:
        p = probs[node].clone()
        accepted = None
        for child in buf.children[node]:
            c = tok[child]
            pc = float(p[c])
            if pc > 0.0 and float(torch.rand((), generator=generator, device=p.device)) < pc:
                accepted = child
                break
            p[c] = 0.0
            total = p.sum()
            if total <= 0:  # p was one-hot on a rejected token: impossible unless p(c) = 1
                break
            p /= total
        if accepted is None:
            bonus = sample(p, generator)
            break
        node = accepted
        nodes.append(node)
        if not buf.children[node]:
            bonus = sample(probs[node], generator)
            break
    idx = torch.tensor(nodes, device=tokens.device)
    return nodes, idx, bonus


def verify_typical(
    tokens: torch.Tensor,
    logits: torch.Tensor,
    buf: TreeBuffers,
    params: SamplingParams,
    generator,
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
    return nodes, idx, sample(probs[nodes[-1]], generator)
