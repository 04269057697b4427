"""Dynamic trees: each step's tree shaped from the drafter's probabilities at that step, output unchanged."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from conftest import hf_greedy, tiny_target

import amphista
from amphista.bench.runner import BenchConfig, prepare
from amphista.decoder import TreeMask
from amphista.drafters import AdversarialDrafter, OracleDrafter, RandomDrafter
from amphista.tree import TreeBuffers, TreeSpec, dynamic_order, dynamic_tree, smaller_trees_accepted


def _value(probs, path) -> float:
    v = 1.0
    for level, rank in enumerate(path):
        v *= probs[level][rank]
    return v


def test_the_dynamic_tree_is_the_most_valuable_prefix_closed_set():
    rng = random.Random(0)
    for _ in range(300):
        depth, width = rng.randint(1, 4), rng.randint(1, 4)
        probs = [sorted((rng.random() ** 3 for _ in range(width)), reverse=True) for _ in range(depth)]
        nodes = rng.randint(2, 14)
        tree = dynamic_tree(probs, nodes)
        every = [p for d in range(1, depth + 1) for p in itertools.product(range(width), repeat=d)]
        best = sorted((_value(probs, p) for p in every), reverse=True)[: nodes - 1]
        assert sum(_value(probs, p) for p in tree.paths) == pytest.approx(sum(best))
        assert tree.num_nodes == min(nodes, len(every) + 1)
        assert TreeSpec.from_paths(tree.to_json()) == tree  # a valid tree, in the canonical order


def test_the_tree_goes_deep_where_the_drafter_is_sure_and_wide_where_it_hesitates():
    sure = [[0.95, 0.02, 0.01]] * 4
    unsure = [[0.3, 0.25, 0.2], [0.5, 0.2, 0.1], [0.9, 0.05, 0.01], [0.9, 0.05, 0.01]]
    assert dynamic_tree(sure, 5).paths == ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0))
    assert dynamic_tree(unsure, 5).paths == ((0,), (1,), (2,), (0, 0))


def test_a_prior_of_measured_path_frequencies_reshapes_the_tree():
    """Head 1 is unsure between two tokens; the table says the second head is right after the top-1 far more
    often than the product of the two guesses suggests (the heads are not independent)."""
    probs = [[0.45, 0.40, 0.1], [0.3, 0.2, 0.1]]
    assert dynamic_tree(probs, 4).paths == ((0,), (1,), (0, 0))
    prior = {(0,): 0.5, (1,): 0.1, (2,): 0.05, (0, 0): 0.45, (0, 1): 0.02}
    assert dynamic_tree(probs, 4, prior).paths == ((0,), (1,), (0, 0))
    assert dynamic_tree(probs, 3, prior).paths == ((0,), (0, 0))  # (0, 0) before (1,)
    assert dynamic_tree(probs, 3).paths == ((0,), (1,))


def _accepted(paths, truth) -> int:
    """Drafts greedy verification accepts from a tree: the target's own chain (`truth`, the rank of its
    argmax among each head's drafts; a rank beyond the drafts: not drafted) as far as the tree holds it."""
    n = 0
    while n < len(truth) and truth[: n + 1] in paths:
        n += 1
    return n


@pytest.mark.parametrize("prior", [None, {(0,): 0.6, (1,): 0.2, (0, 0): 0.5, (0, 1): 0.05, (1, 0): 0.15}])
def test_what_each_smaller_dynamic_tree_would_have_accepted_is_read_off_the_biggest(prior):
    rng = random.Random(7)
    for _ in range(400):
        depth, width = rng.randint(1, 4), rng.randint(1, 4)
        probs = [sorted((rng.random() ** 2 for _ in range(width)), reverse=True) for _ in range(depth)]
        order = dynamic_order(probs, rng.randint(2, 14), prior)
        buf = TreeBuffers.of(TreeSpec.canonical(order))
        assert buf.spec == dynamic_tree(probs, len(order) + 1, prior)
        truth = tuple(rng.choice([0, 0, 1, width]) for _ in range(depth))
        paths = set(buf.spec.paths)
        nodes = [0] + [buf.spec.paths.index(truth[:d]) + 1 for d in range(1, _accepted(paths, truth) + 1)]
        got = smaller_trees_accepted(order, buf, nodes)
        want = [_accepted(set(dynamic_tree(probs, m, prior).paths), truth) for m in range(2, buf.num_nodes + 1)]
        assert got == want


def _spied(decoder) -> list:
    """The (nodes, tokens, smaller) of every step the decoder's tree policy observes."""
    seen, observe = [], decoder.tree_policy.observe

    def spy(rows, nodes, seconds, tokens=None, smaller=None):
        seen.append((nodes, tokens, smaller))
        observe(rows, nodes, seconds, tokens, smaller)

    decoder.tree_policy.observe = spy
    return seen


@pytest.mark.parametrize("rows", [1, 3])
def test_greedy_dynamic_steps_report_every_smaller_trees_acceptance(llama, rows):
    prompts = [[5, 6, 7], [9, 3], [40, 41, 42, 43]][:rows]
    refs = [hf_greedy(llama, p, 40) for p in prompts]
    accuracies = [[0.6, 0.7, 0.75], [0.4, 0.5, 0.55], [0.3, 0.35, 0.4]]
    decoder = amphista.SpeculativeDecoder(
        llama, OracleDrafter(refs[0], 97, 32, num_heads=3, error_rate=0.4, seed=1), tree="auto",
        accuracies=accuracies,
    )
    seen = _spied(decoder)
    if rows == 1:
        outs = [decoder.generate(prompts[0], max_new_tokens=40, eos_token_id=[])]
    else:
        outs = decoder.generate_batch(prompts, max_new_tokens=40, eos_token_id=[])
    assert [o.sequences[0].tolist() for o in outs] == refs
    steps = [(n, t, s) for n, t, s in seen if n > 1]
    assert steps, "the policy chose no tree"
    for nodes, tokens, smaller in steps:  # per row on average where rows decode together
        assert len(smaller) == nodes - 1 and smaller == sorted(smaller) and smaller[0] <= 1
        assert smaller[-1] == pytest.approx(tokens - 1)  # the tree itself accepted what it reports for its size
    assert any(s[-1] > 0 for _, _, s in steps)
    seen.clear()
    if rows == 1:
        decoder.generate(prompts[0], max_new_tokens=20, temperature=0.8, seed=0)
    else:
        decoder.generate_batch(prompts, max_new_tokens=20, temperature=0.8, seed=0)
    assert seen and all(s is None for _, _, s in seen)  # sampling accepts by chance: no counterfactual


@pytest.mark.parametrize("probs, nodes, match", [([[0.5]], 1, "at least 2 nodes"), ([], 4, "at least one head")])
def test_bad_dynamic_tree_arguments(probs, nodes, match):
    with pytest.raises(amphista.TreeError, match=match):
        dynamic_tree(probs, nodes)


def test_a_mask_reused_across_trees_of_any_shape_equals_a_fresh_one():
    trees = [
        TreeSpec.from_paths([[0], [1], [0, 0], [0, 1], [1, 0]]),
        TreeSpec.from_paths([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]),
        TreeSpec.from_paths([[0], [1], [2]]),  # fewer nodes than the first
        TreeSpec.from_paths([[0], [1], [2], [3], [0, 0]]),
    ]
    reused = TreeMask(TreeBuffers(trees[0]), 64, torch.float32, "cpu", None, None)
    start = 3
    for step in range(12):
        buf = TreeBuffers.of(trees[step % len(trees)])
        got = reused(start, buf).clone()
        want = TreeMask(buf, 64, torch.float32, "cpu", None, None)(start)
        assert torch.equal(got, want), step
        start += 1 + step % 3


def test_dynamic_is_on_with_auto_and_off_with_a_given_tree(llama):
    drafter = RandomDrafter(97, 32, num_heads=3)
    accuracies = [[0.6, 0.7], [0.4, 0.5], [0.3, 0.35]]
    assert amphista.SpeculativeDecoder(llama, drafter, tree="auto", accuracies=accuracies).dynamic_trees
    assert not amphista.SpeculativeDecoder(llama, drafter, tree="chain").dynamic_trees
    assert amphista.SpeculativeDecoder(llama, drafter, tree="chain", dynamic=True).dynamic_trees
    decoder = amphista.SpeculativeDecoder(llama, drafter, tree="auto", accuracies=accuracies, dynamic=False)
    assert not decoder.dynamic_trees
    with pytest.raises(amphista.InputError, match="dynamic must be True, False or None"):
        amphista.SpeculativeDecoder(llama, drafter, dynamic="yes")


@pytest.mark.parametrize("arch", ["llama", "gemma2", "mistral_sw"])
def test_dynamic_trees_keep_greedy_output_identical(arch):
    model = tiny_target(arch, seed=3)
    rng = random.Random(arch)
    for trial in range(3):
        prompt = [rng.randrange(3, 97) for _ in range(rng.randint(1, 10))]
        max_new = rng.randint(5, 40)
        ref = hf_greedy(model, prompt, max_new)
        drafters = [
            OracleDrafter(ref, 97, 32, num_heads=4, error_rate=0.4, seed=trial),
            RandomDrafter(97, 32, num_heads=4, seed=trial),
            AdversarialDrafter(ref, 97, 32, num_heads=4, seed=trial),
        ]
        for drafter in drafters:
            for tree in ("chain", [[0], [1], [0, 0], [1, 0], [0, 0, 0]], "mc_sim_7b_63"):
                dec = amphista.SpeculativeDecoder(model, drafter, tree=tree, dynamic=True)
                out = dec.generate(prompt, max_new_tokens=max_new)
                assert out.sequences[0].tolist() == ref, (arch, type(drafter).__name__, tree)
                assert all(1 <= a <= 5 for a in out.accept_lengths)


class _SureOracle(OracleDrafter):
    """The right tokens with near-certainty (the stub's logits are 3 for the truth, 0..1 elsewhere)."""

    def _logits(self, last):
        return super()._logits(last) * 10.0


def test_a_sure_drafter_gets_a_chain_from_a_wide_tree(llama):
    """A wide static tree accepts at most 2 drafts per step; a dynamic one of the same size follows a
    drafter that is sure of its top tokens down to every head."""
    prompt = [5, 6, 7]
    ref = hf_greedy(llama, prompt, 40)
    wide = [[0], [1], [2], [3], [0, 0], [1, 0]]
    static = amphista.SpeculativeDecoder(llama, _SureOracle(ref, 97, 32, num_heads=4), tree=wide)
    dynamic = amphista.SpeculativeDecoder(llama, _SureOracle(ref, 97, 32, num_heads=4), tree=wide, dynamic=True)
    a = static.generate(prompt, max_new_tokens=40, eos_token_id=[])
    b = dynamic.generate(prompt, max_new_tokens=40, eos_token_id=[])
    assert a.sequences[0].tolist() == b.sequences[0].tolist() == ref
    assert max(a.accept_lengths) == 3
    assert b.accept_lengths == [1] + [5] * 7 + [4]  # every head's draft accepted, the bonus token too


@pytest.mark.parametrize("arch", ["llama", "gemma2", "mistral_sw"])
def test_batched_dynamic_trees_keep_every_row_exact_and_sampling_seeded(arch):
    model = tiny_target(arch, seed=4)
    rng = random.Random(arch)
    prompts = [[rng.randrange(3, 97) for _ in range(rng.randint(1, 12))] for _ in range(5)]
    plain = amphista.VanillaDecoder(model)
    ref = [o.new_tokens for o in plain.generate_batch(prompts, max_new_tokens=30)]
    drafters = [RandomDrafter(97, 32, num_heads=4, seed=1), OracleDrafter([], 97, 32, num_heads=4)]
    for drafter in drafters:
        for tree in ([[0], [1], [0, 0], [1, 0], [0, 0, 0]], "chain"):
            dec = amphista.SpeculativeDecoder(model, drafter, tree=tree, dynamic=True)
            outs = dec.generate_batch(prompts, max_new_tokens=30)
            assert [o.new_tokens for o in outs] == ref, (arch, type(drafter).__name__, tree)
    kw = dict(max_new_tokens=20, temperature=0.9, seed=11, eos_token_id=[])
    sampled = [o.new_tokens for o in plain.generate_batch(prompts, **kw)]
    dec = amphista.SpeculativeDecoder(model, RandomDrafter(97, 32, num_heads=3, seed=2), tree="chain", dynamic=True)
    assert [o.new_tokens for o in dec.generate_batch(prompts, **kw)] == sampled


def test_a_trained_drafter_shapes_its_trees_with_its_path_table_and_stays_exact():
    """The bundled drafters carry head_accuracy.json: dynamic trees blend its path frequencies in, alone
    and per row in a batch, and every output still equals plain decoding."""
    from amphista import bundled
    from amphista.tree import build_tree, load_accuracies

    target = bundled.load_default_target()
    prompts = [target.tokenizer(s).input_ids for s in ("Once upon a time", "The little dog", "Lily wanted to")]
    plain = amphista.VanillaDecoder(target)
    ref = [o.new_tokens for o in plain.generate_batch(prompts, max_new_tokens=48)]
    for name in ("amphista", "medusa"):
        drafter = bundled.load_default_drafter(name, target)
        tree = build_tree(load_accuracies(drafter.accuracy_file, greedy=True), 8)
        dec = amphista.SpeculativeDecoder(target, drafter, tree=tree, dynamic=True)
        assert dec.tree_prior and all(len(p) <= drafter.num_heads for p in dec.tree_prior)
        assert [o.new_tokens for o in dec.generate_batch(prompts, max_new_tokens=48)] == ref
        assert [dec.generate(p, max_new_tokens=48).new_tokens for p in prompts] == ref
        assert not amphista.SpeculativeDecoder(target, drafter, tree=tree).tree_prior  # static: not read


def test_batched_dynamic_trees_follow_each_rows_drafts(llama):
    """Rows decoding the same prompt with a sure drafter accept every head's draft, as one row does."""
    prompt = [5, 6, 7]
    ref = hf_greedy(llama, prompt, 40)
    wide = [[0], [1], [2], [3], [0, 0], [1, 0]]
    dec = amphista.SpeculativeDecoder(llama, _SureOracle(ref, 97, 32, num_heads=4), tree=wide, dynamic=True)
    outs = dec.generate_batch([prompt, prompt], max_new_tokens=40, eos_token_id=[])
    for out in outs:
        assert out.sequences[0].tolist() == ref
        assert out.accept_lengths == [1] + [5] * 7 + [4]


def test_drafted_probabilities_come_with_the_top_tokens(tiny_drafters):
    target, drafters = tiny_drafters
    for drafter in drafters:
        drafter.reset(32)
        hidden = torch.randn(1, 3, target.config.hidden_size)
        ids, probs = drafter.draft_topk_probs(hidden, torch.tensor([[4, 5, 6]]), 0, 2, 3)
        drafter.reset(32)
        assert torch.equal(ids, drafter.draft_topk(hidden, torch.tensor([[4, 5, 6]]), 0, 2, 3))
        assert probs.dtype == torch.float32 and probs.shape == (2, 3)
        assert (probs[:, :-1] >= probs[:, 1:]).all() and (probs.sum(-1) <= 1.0 + 1e-6).all()
        drafter.reset_rows(2, 32)
        rows = drafter.draft_rows(hidden.expand(2, -1, -1), torch.tensor([[4, 5, 6]] * 2), torch.tensor([0, 0]),
                                  torch.tensor([3, 3]), 2, 3, probs=True)  # fmt: skip
        assert torch.equal(rows[0][0], ids) and torch.allclose(rows[1][0], probs, atol=1e-5)


@pytest.fixture
def tiny_drafters(llama):
    from amphista.drafters import AmphistaDrafter, MedusaDrafter

    made = []
    for cls in (AmphistaDrafter, MedusaDrafter):
        for d2t in (None, list(range(3, 19))):  # the full vocabulary, then a draft vocabulary of 16
            torch.manual_seed(0)
            made.append(cls.for_target(llama, 3, d2t=d2t).eval())
    return llama, made


def test_bench_runs_both_shapes_side_by_side(tmp_path):
    cfg = BenchConfig(tree_sweep=[4], tree_shape="both", limit=1, max_new_tokens=8, runs=1, progress=False)
    _, _, methods, sweep = prepare(cfg)
    shapes = {m.name: m.info["tree"]["shape"] for m in methods if m.kind == "speculative"}
    assert shapes == {
        "amphista:static@4": "static",
        "amphista:dynamic@4": "dynamic",
        "medusa:static@4": "static",
        "medusa:dynamic@4": "dynamic",
    }
    assert set(sweep) == {"amphista:static", "amphista:dynamic", "medusa:static", "medusa:dynamic"}
    with pytest.raises(amphista.InputError, match="tree_shape must be one of"):
        prepare(BenchConfig(tree_shape="wavy"))
