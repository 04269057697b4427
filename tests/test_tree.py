"""Tree specs: validation, buffers, and the builder from head accuracies."""

from __future__ import annotations

import itertools
import json
import random

import pytest

import amphista
from amphista.tree import (
    HeadAccuracy,
    TreeBuffers,
    TreeSpec,
    build_tree,
    dynamic_tree,
    expected_tau,
    load_accuracies,
    rank_probs_from_topk,
)

# Medusa's published Vicuna-7B top-1 accuracies with plausible top-k growth.
ACC = [[0.56, 0.70, 0.76, 0.80], [0.32, 0.45, 0.52, 0.57], [0.20, 0.30, 0.36, 0.40], [0.15, 0.23, 0.28, 0.32]]


@pytest.mark.parametrize(
    "paths, match",
    [
        ([], "non-empty list"),
        ("[[0]]x", "unknown tree"),
        ([[0], []], "non-empty list of top-k ranks"),
        ([[0], [-1]], "non-negative integers"),
        ([[0], [0.5]], "non-negative integers"),
        ([[0], [0]], "appears twice"),
        ([[0], [1, 0]], "has no parent \\[1\\]"),
    ],
)
def test_invalid_trees(paths, match):
    with pytest.raises(amphista.TreeError, match=match):
        TreeSpec.load(paths)


def test_invalid_tree_file(tmp_path):
    bad = tmp_path / "tree.json"
    bad.write_text("[[0], [1")
    with pytest.raises(amphista.TreeError, match="not valid JSON"):
        TreeSpec.load(str(bad))
    good = tmp_path / "good.json"
    good.write_text(json.dumps([[0], [0, 0]]))
    assert TreeSpec.load(str(good)).num_nodes == 3


def test_medusa_default_tree_and_buffers():
    spec = TreeSpec.load("mc_sim_7b_63")
    assert spec.num_nodes == 64 and spec.depth == 4
    buf = TreeBuffers(spec)
    # Every node attends to itself and exactly its ancestors, root included.
    for i, path in enumerate(spec.paths, start=1):
        assert int(buf.mask[i].sum()) == len(path) + 1
        assert int(buf.depth[i]) == len(path)
        assert spec.paths[int(buf.parent[i]) - 1] == path[:-1] if len(path) > 1 else int(buf.parent[i]) == 0
    # Retrieve rows end at leaves and cover every node.
    covered = set(buf.retrieve[buf.valid].tolist())
    assert covered == set(range(spec.num_nodes))


@pytest.mark.parametrize("nodes", [8, 22, 35, 45, 64, 128])
def test_builder_sizes_and_validity(nodes):
    spec = build_tree(ACC, nodes)
    assert spec.num_nodes == nodes
    assert spec.depth <= len(ACC)
    TreeSpec.from_paths(spec.to_json())  # prefix-closed and without duplicates


def test_builder_is_optimal_on_a_small_instance():
    acc = [[0.5, 0.7, 0.8], [0.3, 0.45, 0.5], [0.2, 0.3, 0.35]]
    probs = rank_probs_from_topk(acc)
    all_paths = [p for d in range(1, 4) for p in itertools.product(range(3), repeat=d)]
    best = 0.0
    for subset in itertools.combinations(all_paths, 5):
        s = set(subset)
        if all(len(p) == 1 or p[:-1] in s for p in s):
            best = max(best, TreeSpec.from_paths([list(p) for p in s]).expected_accept_length(probs))
    built = build_tree(acc, 6)
    assert built.expected_accept_length(probs) == pytest.approx(best)


def test_bigger_trees_never_expect_less():
    probs = rank_probs_from_topk(ACC)
    taus = [build_tree(ACC, n).expected_accept_length(probs) for n in (8, 16, 32, 64, 128)]
    assert taus == sorted(taus) and taus[-1] > taus[0]


def test_load_accuracies(tmp_path):
    f = tmp_path / "acc.json"
    f.write_text(json.dumps({"top_k": ACC}))
    assert load_accuracies(f) == ACC
    assert load_accuracies(f, greedy=True) == ACC  # no top_k_target: the data accuracies serve
    greedy = [[min(1.0, x + 0.1) for x in row] for row in ACC]
    f.write_text(json.dumps({"top_k": ACC, "top_k_target": greedy}))
    assert load_accuracies(f) == ACC and load_accuracies(f, greedy=True) == greedy
    f.write_text(json.dumps({"something": 1}))
    with pytest.raises(amphista.TreeError, match="holds no head accuracies"):
        load_accuracies(f)
    f.write_bytes(b'{"top_k":\n [[0.5, 0.7]], "note": "caf\xe9"}')
    with pytest.raises(amphista.TreeError, match=r"not UTF-8 text: byte 0xe9 at line 2 \(byte offset 37\)"):
        load_accuracies(f)
    f.write_text('{"top_k":\n [[0.5, 0.7]],}')
    with pytest.raises(amphista.TreeError, match="not valid JSON: line 2"):
        load_accuracies(f)


def test_measured_path_frequencies_beat_the_independence_guess(tmp_path):
    top_k = [[0.5, 0.9], [0.5, 0.9]]
    # Independent heads: [0, 0] (0.25) before [1, 0] (0.2). Measured: the heads are correlated the other way.
    assert build_tree(top_k, 4).paths == ((0,), (1,), (0, 0))
    measured = [[[0], 0.5], [[1], 0.4], [[1, 0], 0.35], [[0, 0], 0.1], [[0, 1], 0.05]]
    f = tmp_path / "acc.json"
    f.write_text(json.dumps({"top_k": top_k, "top_k_target": top_k, "paths_target": measured}))
    acc = load_accuracies(f, greedy=True)
    assert acc == top_k and acc.paths[(1, 0)] == 0.35
    tree = build_tree(acc, 4)
    assert tree.paths == ((0,), (1,), (1, 0))
    assert expected_tau(tree, acc) == pytest.approx(1 + 0.5 + 0.4 + 0.35)
    assert load_accuracies(f).paths is None  # sampling reads the data-label table, absent here
    # Deeper than measured: the deepest measured value times the head's rank probability.
    deep = build_tree(HeadAccuracy(top_k + [[0.5, 0.9]], acc.paths), 5)
    assert deep.paths[-1] == (1, 0, 0)
    assert expected_tau(deep, HeadAccuracy(top_k + [[0.5, 0.9]], acc.paths)) == pytest.approx(2.25 + 0.35 * 0.5)


def test_malformed_path_frequencies_are_named(tmp_path):
    f = tmp_path / "acc.json"
    f.write_text(json.dumps({"top_k": ACC, "paths": [[[0], "x"]]}))
    with pytest.raises(amphista.TreeError, match="malformed path frequencies"):
        load_accuracies(f)


@pytest.mark.parametrize("nodes", [2, 5, 16, 64])
def test_buffers_match_their_definitions(nodes):
    """Every buffer of a dynamic tree (any shape) against its definition, path by path."""
    gen = random.Random(nodes)
    probs = [sorted((gen.random() for _ in range(6)), reverse=True) for _ in range(4)]
    spec = dynamic_tree(probs, nodes)
    buf = TreeBuffers(spec)
    paths = [()] + list(spec.paths)  # node i holds path paths[i]; the root, the empty path
    n = len(paths)
    expected_mask = [[paths[i][: len(paths[j])] == paths[j] for j in range(n)] for i in range(n)]
    assert buf.mask.tolist() == expected_mask  # a node sees itself and exactly its ancestors
    assert buf.parent.tolist() == [0] + [paths.index(p[:-1]) for p in paths[1:]]
    assert buf.depth.tolist() == buf.depths == [len(p) for p in paths]
    leaves = [i for i in range(1, n) if not any(q[:-1] == paths[i] for q in paths[1:])]
    width = spec.depth + 1
    for row, leaf in enumerate(leaves):
        chain = [paths.index(paths[leaf][:d]) for d in range(len(paths[leaf]) + 1)]
        assert buf.retrieve[row].tolist() == chain + [leaf] * (width - len(chain))
        assert buf.valid[row].tolist() == [True] * len(chain) + [False] * (width - len(chain))
    assert buf.retrieve.shape == (len(leaves), width)
    for i in range(n):
        kids = sorted((j for j in range(1, n) if paths[j][:-1] == paths[i]), key=lambda j: paths[j][-1])
        assert buf.children[i] == kids
    assert buf.head.tolist() == [len(p) - 1 for p in spec.paths]
    assert buf.rank.tolist() == [p[-1] for p in spec.paths]
