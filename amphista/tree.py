"""Token trees: validation, the per-tree buffers the decoder needs, and a builder from head accuracies.

A tree is a list of paths in Medusa's format: each path is a list of top-k ranks, one per head, so the
node [0, 2] is "head 0's top-1 token, then head 1's top-3 token". The root (the last committed token) is
implicit. Node i of the flattened tree (0 = root) is verified at position prefix_len + depth(i).
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
import os
from dataclasses import dataclass
from functools import cached_property, lru_cache
from importlib import resources

import torch

from .errors import TreeError

NAMED_TREES = ("mc_sim_7b_63", "chain")


@dataclass(frozen=True)
class TreeSpec:
    """A validated tree: paths sorted by depth then ranks, so a parent always precedes its children."""

    paths: tuple[tuple[int, ...], ...]

    @classmethod
    def from_paths(cls, paths) -> TreeSpec:
        if isinstance(paths, TreeSpec):
            return paths
        if not isinstance(paths, (list, tuple)) or len(paths) == 0:
            raise TreeError("a tree must be a non-empty list of paths such as [[0], [1], [0, 0]]")
        seen = set()
        for i, path in enumerate(paths):
            if not isinstance(path, (list, tuple)) or len(path) == 0:
                raise TreeError(
                    f"tree path #{i} is {path!r}: each path must be a non-empty list of top-k ranks"
                )
            if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in path):
                raise TreeError(f"tree path #{i} is {path!r}: ranks must be non-negative integers")
            key = tuple(path)
            if key in seen:
                raise TreeError(f"tree path {list(key)} appears twice: remove the duplicate")
            seen.add(key)
        for key in seen:
            if len(key) > 1 and key[:-1] not in seen:
                raise TreeError(
                    f"tree path {list(key)} has no parent {list(key[:-1])}: every prefix of a path must also be a path"
                )
        return cls.canonical(seen)

    @classmethod
    def canonical(cls, paths) -> TreeSpec:
        """The tree of valid `paths` (tuples, prefix-closed), in the canonical order: by depth, then by ranks."""
        return cls(tuple(sorted(paths, key=lambda p: (len(p), p))))

    @classmethod
    def chain(cls, depth: int) -> TreeSpec:
        return cls.from_paths([[0] * d for d in range(1, depth + 1)])

    @classmethod
    def load(cls, tree, num_heads: int | None = None) -> TreeSpec:
        """A TreeSpec from a name ("mc_sim_7b_63", "chain"), a JSON file path or a list of paths."""
        if isinstance(tree, TreeSpec):
            return tree
        if isinstance(tree, str):
            if tree == "chain":
                if num_heads is None:
                    raise TreeError("the 'chain' tree needs the drafter's number of heads")
                return cls.chain(num_heads)
            if tree in NAMED_TREES:
                text = resources.files("amphista").joinpath("assets", "trees", f"{tree}.json").read_text()
                return cls.from_paths(json.loads(text))
            if os.path.isfile(tree):
                try:
                    with open(tree) as f:
                        data = json.load(f)
                except json.JSONDecodeError as e:
                    raise TreeError(
                        f"tree file {tree!r} is not valid JSON ({e}): it must hold a list of paths"
                    ) from e
                if isinstance(data, dict) and "paths" in data:
                    data = data["paths"]
                return cls.from_paths(data)
            raise TreeError(
                f"unknown tree {tree!r}: use one of {', '.join(NAMED_TREES)}, a JSON file of paths, or a list of paths"
            )
        return cls.from_paths(tree)

    @property
    def depth(self) -> int:
        return max(len(p) for p in self.paths)

    @property
    def num_nodes(self) -> int:
        """Tokens verified per step, root included."""
        return len(self.paths) + 1

    @cached_property
    def max_rank(self) -> int:
        return max(max(p) for p in self.paths)

    def to_json(self) -> list[list[int]]:
        return [list(p) for p in self.paths]

    def expected_accept_length(self, rank_probs: list[list[float]]) -> float:
        """tau under independent heads: 1 (bonus) + sum over nodes of the product of rank probabilities."""
        total = 1.0
        for path in self.paths:
            prob = 1.0
            for head, rank in enumerate(path):
                row = rank_probs[head] if head < len(rank_probs) else []
                prob *= row[rank] if rank < len(row) else 0.0
            total += prob
        return total


# A node missing from the measured path table was accepted less often than the table records.
_UNMEASURED = 1e-6


def dynamic_tree(probs: list[list[float]], num_nodes: int, prior: dict | None = None) -> TreeSpec:
    """The `num_nodes`-token tree (root included) that one step's drafts promise the most accepted tokens
    (see dynamic_order, whose paths it holds)."""
    return TreeSpec.canonical(dynamic_order(probs, num_nodes, prior))


def dynamic_order(probs: list[list[float]], num_nodes: int, prior: dict | None = None) -> list[tuple[int, ...]]:
    """The paths of dynamic_tree's `num_nodes`-token tree in the order they were chosen, best first. The picks
    do not depend on `num_nodes`, which only ends them, so the first m - 1 paths are the m-node tree of the
    same drafts: what a step would have accepted with any smaller tree can be read off this one.

    probs[h][r] is the drafter's own probability for head h's rank-r token at this step (ranks sorted best
    first). Without `prior` a node's value is the product of its ranks' probabilities, the chance that every
    token on its path is right were the heads calibrated and independent: the tree follows the drafter's
    confidence, deep where it is sure, wide where it hesitates. A child never beats its parent and a rank
    never beats a better rank, so taking nodes best-first from a frontier gives the best prefix-closed set
    (a node of rank r comes after its r better siblings; ties go to the better rank, then the shallower).

    `prior`, the measured path frequencies of the drafter's head accuracies (`HeadAccuracy.paths`: how often
    each node was accepted on held-out text), blends in what the product misses, that heads are not
    independent: a node is then worth the geometric mean of its frequency and its product. Offline, on
    held-out text, the product alone beat the static tree by 4-9% in tau on SmolLM2 but lost 1-3% on the
    bundled model, whose heads' correlations the table captures; the blend beat the static tree on both
    (SmolLM2 +2-9%, bundled +0.5-2%, at 4-16 nodes). Values are then nearly but not exactly ordered by
    rank: the frontier is the same, a good tree rather than a proven best one.
    """
    if num_nodes < 2:
        raise TreeError(f"a tree needs at least 2 nodes (the root and one candidate), got {num_nodes}")
    depth, width = len(probs), len(probs[0]) if probs else 0
    if depth == 0 or width == 0:
        raise TreeError("a dynamic tree needs the drafter's probabilities for at least one head and rank")

    def value(path: tuple[int, ...], product: float) -> float:
        return product if prior is None else math.sqrt(prior.get(path, _UNMEASURED) * product)

    # Entries (-value, path, product of its probabilities, its parent's product). Popping a node pushes only
    # its next sibling and its first child: every other candidate is worth no more than one of those.
    first = probs[0][0]
    frontier = [(-value((0,), first), (0,), first, 1.0)]
    chosen: list[tuple[int, ...]] = []
    while frontier and len(chosen) < num_nodes - 1:
        _, path, product, parent = heapq.heappop(frontier)
        chosen.append(path)
        rank, level = path[-1], len(path) - 1
        if rank + 1 < width:
            sibling, p = path[:-1] + (rank + 1,), parent * probs[level][rank + 1]
            heapq.heappush(frontier, (-value(sibling, p), sibling, p, parent))
        if level + 1 < depth:
            child, p = path + (0,), product * probs[level + 1][0]
            heapq.heappush(frontier, (-value(child, p), child, p, product))
    return chosen


def smaller_trees_accepted(order: list[tuple[int, ...]], buf: TreeBuffers, nodes: list[int]) -> list[int]:
    """Greedy drafts the dynamic tree of each size would have accepted at this step: entry m - 2 for the
    m-node tree, m = 2 .. the tree's nodes. `order`: the tree's paths as dynamic_order chose them; `nodes`:
    the accepted nodes, root first. An m-node tree holds the first m - 1 paths of `order`, and greedy
    verification accepts the target's own argmax chain as far as the tree holds it, so what it accepts is
    the accepted nodes among those paths: exact, for every smaller size, from the one step."""
    place = {p: i for i, p in enumerate(order)}
    picks = sorted(place[buf.spec.paths[i - 1]] for i in nodes[1:])  # a chain: each pick after its parent
    return [bisect.bisect_left(picks, m - 1) for m in range(2, buf.num_nodes + 1)]


class FixedTree:
    """The tree policy of a decoder given one tree: every step verifies `spec`, whatever the batch size."""

    def __init__(self, spec: TreeSpec):
        self.spec = spec
        self.max_nodes = spec.num_nodes

    def choose(self, rows: int, fresh: bool = False, ragged: bool = True) -> TreeSpec:
        return self.spec


class TreeBuffers:
    """Index tensors built once per tree and device; every step reuses them (`TreeBuffers.of` keeps the
    buffers of recently used trees, for decoders whose tree changes from step to step)."""

    @staticmethod
    @lru_cache(maxsize=4096)
    def of(spec: TreeSpec, device: torch.device | str = "cpu") -> TreeBuffers:
        return TreeBuffers(spec, device)

    def __init__(self, spec: TreeSpec, device: torch.device | str = "cpu"):
        # From Python lists, one tensor op per buffer: dynamic trees meet a new tree every few steps, and
        # element-wise tensor writes made a 16-node tree's buffers cost ~0.3 ms, a fifth of a bundled step.
        self.spec = spec
        n, paths = spec.num_nodes, spec.paths
        index = {p: i + 1 for i, p in enumerate(paths)}
        parent = [0] + [index.get(p[:-1], 0) for p in paths]
        depth = [0] + [len(p) for p in paths]
        chains = [[0]]  # node i's ancestors from the root down, itself last (paths are prefix-closed, in order)
        for i in range(1, n):
            chains.append(chains[parent[i]] + [i])
        children: list[list[int]] = [[] for _ in range(n)]
        for i in range(1, n):
            children[parent[i]].append(i)
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[[i for i, c in enumerate(chains) for _ in c], [j for c in chains for j in c]] = True
        # One row per leaf: the node indices from the root down, padded by repeating the leaf.
        width = spec.depth + 1
        leaves = [chains[i] for i in range(1, n) if not children[i]]
        retrieve = torch.tensor([c + c[-1:] * (width - len(c)) for c in leaves], dtype=torch.long).view(-1, width)
        valid = torch.tensor([[True] * len(c) + [False] * (width - len(c)) for c in leaves], dtype=torch.bool)
        valid = valid.view(-1, width)
        for c in children:  # try siblings best rank first
            c.sort(key=lambda i: paths[i - 1][-1])

        self.num_nodes = n
        self.device = torch.device(device)
        self.parent = torch.tensor(parent, device=device)  # (N,)
        self.depth = torch.tensor(depth, device=device)  # (N,)
        self.mask = mask.to(device)  # (N, N) node i may attend to node j
        self.retrieve = retrieve.to(device)  # (P, D+1)
        self.valid = valid.to(device)  # (P, D+1)
        self.children = children
        self.depths = depth  # the same as a list: verification walks it on the host
        # Candidate i (1..N-1) is rank p[-1] of head len(p) - 1: its place in the (depth, max_rank + 1) top-k
        # table read row by row, so that the tree's tokens are one gather.
        # As (head, rank) pairs, for a table of any width (dynamic trees of one batch share one).
        self.head = torch.tensor([len(p) - 1 for p in spec.paths], device=device)  # (N-1,)
        self.rank = torch.tensor([p[-1] for p in spec.paths], device=device)  # (N-1,)
        self.flat = self.head * (spec.max_rank + 1) + self.rank  # (N-1,)


def rank_probs_from_topk(topk_acc: list[list[float]]) -> list[list[float]]:
    """Cumulative top-k accuracies per head -> probability that rank r is the right token."""
    probs = []
    for row in topk_acc:
        prev, out = 0.0, []
        for acc in row:
            out.append(max(float(acc) - prev, 0.0))
            prev = max(prev, float(acc))
        probs.append(out)
    return probs


class HeadAccuracy(list):
    """A drafter's per-head cumulative top-k accuracies (a plain list of lists, as `build_tree` takes), plus
    `paths` when they were measured: {node path: fraction of positions where that node is accepted}."""

    def __init__(self, top_k, paths: dict[tuple[int, ...], float] | None = None):
        super().__init__(top_k)
        self.paths = paths


def _node_values(topk_acc):
    """node path -> estimated probability that the node is accepted (a child never beats its parent)."""
    probs = rank_probs_from_topk(topk_acc)
    if not probs or not all(probs):
        raise TreeError("head accuracies must be a non-empty list of per-head top-k accuracy lists")
    paths = getattr(topk_acc, "paths", None)
    measured = max((len(p) for p in paths), default=0) if paths else 0

    def value(path: tuple[int, ...], parent_value: float) -> float:
        if len(path) <= measured:
            return paths.get(path, 0.0)
        # Medusa's independence assumption: the parent's value times this rank's probability.
        row = probs[len(path) - 1]
        return parent_value * (row[path[-1]] if path[-1] < len(row) else 0.0)

    return probs, value


def build_tree(topk_acc: list[list[float]], num_nodes: int) -> TreeSpec:
    """The tree of `num_nodes` tokens (root included) with the highest expected accepted length.

    topk_acc[h][k] is head h's measured top-(k+1) accuracy. Under Medusa's independence assumption a
    node's value is the product of its ranks' probabilities. When `topk_acc` carries measured path
    frequencies (a `HeadAccuracy` from `load_accuracies`), a node's value is how often it was accepted,
    which needs no such assumption. Either way a child never beats its parent, so taking nodes best-first
    from a frontier gives the optimal prefix-closed set.
    """
    if num_nodes < 2:
        raise TreeError(f"a tree needs at least 2 nodes (the root and one candidate), got {num_nodes}")
    probs, value = _node_values(topk_acc)
    frontier = [(-value((r,), 1.0), (r,)) for r in range(len(probs[0]))]
    heapq.heapify(frontier)
    chosen: list[tuple[int, ...]] = []
    while frontier and len(chosen) < num_nodes - 1:
        neg, path = heapq.heappop(frontier)
        chosen.append(path)
        if len(path) < len(probs):
            for r in range(len(probs[len(path)])):
                child = path + (r,)
                heapq.heappush(frontier, (-value(child, -neg), child))
    return TreeSpec.from_paths([list(p) for p in chosen])


def expected_tau(tree: TreeSpec, topk_acc: list[list[float]]) -> float:
    """Expected tokens per step (bonus included) of `tree`, from measured path frequencies when `topk_acc`
    has them, else under independent heads."""
    return 1.0 + sum(accepted_by_depth(tree, topk_acc))


def accepted_by_depth(tree: TreeSpec, topk_acc: list[list[float]]) -> list[float]:
    """Expected accepted drafts of `tree` at depth 1, 2, ...: the chance that some node of that depth is
    accepted (its nodes exclude each other). Their sum plus the bonus token is `expected_tau`."""
    _, value = _node_values(topk_acc)
    values = {(): 1.0}
    for path in tree.paths:  # parents come first
        values[path] = value(path, values[path[:-1]])
    by_depth = [0.0] * tree.depth
    for path in tree.paths:
        by_depth[len(path) - 1] += values[path]
    return by_depth


def load_accuracies(path: str | os.PathLike, greedy: bool = False) -> HeadAccuracy:
    """Read per-head top-k accuracies from a JSON file written by training or `heads-accuracy`.

    greedy=True reads `top_k_target` when the file has it: accuracy against the target's own argmax, which
    is exactly what greedy verification accepts, so trees for greedy decoding are built from it. The measured
    path frequencies (`paths_target` / `paths`) come along when present, and `build_tree` prefers them."""
    from .training.data import read_text

    text = read_text(path, "head accuracy file", error=TreeError)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TreeError(
            f"head accuracy file {str(path)!r} is not valid JSON: line {e.lineno}, {e.msg}; "
            "write it with `amphista heads-accuracy --json FILE`"
        ) from None
    paths = None
    if isinstance(data, dict):
        table = (greedy and data.get("paths_target")) or data.get("paths")
        data = (greedy and data.get("top_k_target")) or data.get("top_k") or data.get("topk") or data.get("accuracy")
        if table:
            try:
                paths = {tuple(int(r) for r in p): float(f) for p, f in table}
            except (TypeError, ValueError) as e:
                raise TreeError(
                    f"{str(path)!r} has malformed path frequencies ({e}): expected [[path, frequency], ...] "
                    "as `amphista heads-accuracy` writes them"
                ) from e
    if not isinstance(data, list) or not all(isinstance(r, list) and r for r in data):
        raise TreeError(
            f'{str(path)!r} holds no head accuracies: expected {{"top_k": [[top1, top2, ...] per head]}}'
        )
    return HeadAccuracy([[float(x) for x in row] for row in data], paths)
