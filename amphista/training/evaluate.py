"""Held-out per-head top-k accuracy: the numbers the tree builder reads (`head_accuracy.json`).

`top_k[k][j]` is the fraction of labelled positions where head k's true token is among its j+1 best
tokens (cumulative, as `amphista.tree.build_tree` expects). The label is the data token; `top_k_target`
uses the frozen target's own greedy prediction instead, which is what greedy verification accepts.

`paths_target` (and `paths`, against the data) measure the heads jointly: for each tree node, a path of
ranks such as [0, 1] ("head 1's top-1, then head 2's top-2"), the fraction of positions where every head
along the path has the right token at exactly that rank, i.e. where the node would be accepted. The heads
of one drafter are far from independent (Amphista's attend to each other), so trees built from these
beat trees built from the per-head table under Medusa's independence assumption.

A drafter with a reduced draft vocabulary ranks only its N tokens, mapped back to target ids before they
are compared with the labels: a label outside them is a miss at every rank, as in decoding, where the
drafter cannot propose it. `lm_loss` is then over the labels inside the draft vocabulary (the rest have
probability 0) and `label_coverage` gives, per head, the fraction of labels inside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .batching import collate, head_labels
from .data import Example

TOPK = 5
MIN_PATH_FREQUENCY = 1e-4  # rarer nodes are left out of the json: no tree worth building reaches them
PATH_DEPTH = 6  # nodes deeper than this are measured by the per-head table only (TOPK ** depth counters)


@torch.no_grad()
def head_accuracy(drafter, target, examples: list[Example], batch_size: int = 8, pad_id: int = 0) -> dict:
    """Evaluate `drafter` on `examples` with the frozen `target`; returns the head_accuracy.json dict."""
    was_training = drafter.training
    drafter.eval()
    K = drafter.num_heads
    dtype = next(drafter.parameters()).dtype
    hits = torch.zeros(2, K, TOPK)  # data label, target label
    counts = torch.zeros(2, K)
    # Node counts per depth d, indexed by the ranks along the path read as a base-TOPK number.
    path_hits = [torch.zeros(2, TOPK ** (d + 1)) for d in range(min(K, PATH_DEPTH))]
    path_positions = torch.zeros(2)
    nll = torch.zeros(K)
    nll_counts = torch.zeros(K)  # labels the drafter can propose: all of them without a draft vocabulary
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # little padding
    for i in range(0, len(order), batch_size):
        ids, mask = collate([examples[j] for j in order[i : i + batch_size]], pad_id)
        ids, mask = ids.to(target.device), mask.to(target.device)
        hidden, logits = target.forward_train(ids)  # (B, T, d), (B, T, V)
        T = ids.shape[1]
        labels = head_labels(ids, mask, K)  # (B, T-1, K)
        greedy = F.pad(logits.argmax(-1), (0, K))  # (B, T+K): the target's prediction of token t+1
        # Head k at t is checked against the target's prediction at t+1+k, where the data has a label.
        target_labels = torch.stack([greedy[:, 1 + k : k + T] for k in range(K)], -1).masked_fill(labels < 0, -100)
        feats = drafter.features(hidden[:, :-1].to(dtype), ids[:, 1:])  # (B, T-1, K, D)
        step = max(1, 4096 // ids.shape[0])  # a few thousand positions per vocabulary projection
        for c in range(0, T - 1, step):
            q = drafter.project(feats[:, c : c + step]).float()  # (B, c, K, V), or N draft tokens
            top = _top_target_ids(drafter, q)  # (B, c, K, TOPK)
            lab = labels[:, c : c + q.shape[1]].cpu()
            for row, lab_row in enumerate((lab, target_labels[:, c : c + q.shape[1]].cpu())):
                valid = lab_row >= 0  # (B, c, K)
                found = (top == lab_row.unsqueeze(-1)).cumsum(-1).clamp(max=1)  # (B, c, K, TOPK)
                hits[row] += (found * valid.unsqueeze(-1)).sum((0, 1)).float()
                counts[row] += valid.sum((0, 1)).float()
                _count_paths(top, lab_row, row, path_hits, path_positions)
            draft_lab = lab if getattr(drafter, "d2t", None) is None else drafter.draft_ids(lab).cpu()
            valid = draft_lab >= 0
            ce = -F.log_softmax(q, -1).cpu().gather(-1, draft_lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll += torch.where(valid, ce, torch.zeros(())).sum((0, 1))
            nll_counts += valid.sum((0, 1)).float()
    drafter.train(was_training)
    acc = hits / counts.clamp(min=1).unsqueeze(-1)
    result = {
        "top_k": [[round(float(x), 6) for x in row] for row in acc[0]],
        "top_k_target": [[round(float(x), 6) for x in row] for row in acc[1]],
        "paths": _path_table(path_hits, path_positions, 0),
        "paths_target": _path_table(path_hits, path_positions, 1),
        "lm_loss": [round(float(x), 6) for x in nll / nll_counts.clamp(min=1)],
        "positions": [int(x) for x in counts[0]],
        "examples": len(examples),
    }
    if getattr(drafter, "d2t", None) is not None:
        result["draft_vocab_size"] = int(drafter.d2t.numel())
        result["label_coverage"] = [round(float(x), 6) for x in nll_counts / counts[0].clamp(min=1)]
    return result


def _top_target_ids(drafter, q: torch.Tensor) -> torch.Tensor:
    """q (..., K, V or N) -> (..., K, TOPK) target ids of the best tokens on the CPU; -1 pads ranks a draft
    vocabulary smaller than TOPK does not have (never equal to a label)."""
    top = q.topk(min(TOPK, q.shape[-1]), dim=-1).indices
    if getattr(drafter, "d2t", None) is not None:
        top = drafter.target_ids(top)
    top = top.cpu()
    if top.shape[-1] < TOPK:
        top = F.pad(top, (0, TOPK - top.shape[-1]), value=-1)
    return top


def _count_paths(top, labels, row, path_hits, path_positions) -> None:
    """Add one chunk's joint rank counts. top (B, c, K, TOPK) indices; labels (B, c, K), -100 = none.

    Only positions where every head has a label count, so that a node and its ancestors share one
    denominator and a child's frequency never exceeds its parent's."""
    K = len(path_hits)
    full = (labels >= 0).all(-1)  # (B, c)
    eq = top[full] == labels[full].unsqueeze(-1)  # (P, K, TOPK)
    rank = torch.where(eq.any(-1), eq.long().argmax(-1), TOPK)  # (P, K); TOPK = not in the top-k
    path_positions[row] += rank.shape[0]
    code = torch.zeros(rank.shape[0], dtype=torch.long)
    alive = torch.ones(rank.shape[0], dtype=torch.bool)
    for d in range(K):
        alive &= rank[:, d] < TOPK
        code = code * TOPK + rank[:, d].clamp(max=TOPK - 1)
        path_hits[d][row] += torch.bincount(code[alive], minlength=TOPK ** (d + 1)).float()


def _path_table(path_hits, path_positions, row: int) -> list:
    """[[path, frequency], ...], most frequent first, nodes rarer than MIN_PATH_FREQUENCY left out."""
    total = float(path_positions[row])
    out = []
    for d, counts in enumerate(path_hits):
        for code in torch.nonzero(counts[row] >= max(total, 1.0) * MIN_PATH_FREQUENCY).flatten().tolist():
            path = [(code // TOPK ** (d - j)) % TOPK for j in range(d + 1)]
            out.append([path, round(float(counts[row, code]) / total, 6)])
    out.sort(key=lambda e: (-e[1], len(e[0]), e[0]))
    return out


def format_table(result: dict, title: str = "held-out head accuracy") -> str:
    """A table with one row per head: top-1..top-5 against the data, top-1 against the target's greedy."""
    header = "head " + "".join(f"  top-{j + 1}" for j in range(TOPK)) + "  tgt@1  labels"
    lines = [f"{title} ({result.get('examples', '?')} examples)", header]
    for k, row in enumerate(result["top_k"]):
        target_top1 = result["top_k_target"][k][0] if "top_k_target" in result else float("nan")
        lines.append(
            f"{k + 1:>4} " + "".join(f"  {x:5.3f}" for x in row) + f"  {target_top1:5.3f}  {result['positions'][k]:>6}"
        )
    lines.append("(Medusa, Vicuna-7B, top-1 for heads 1-4: 0.56 0.32 0.20 0.15)")
    return "\n".join(lines)
