"""tree="auto" chooses per step within one call: plain steps and trees of any size mix, output unchanged."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import hf_greedy, tiny_target

import amphista
from amphista import AmphistaDrafter, MedusaDrafter, TargetModel
from amphista.drafters import OracleDrafter, RandomDrafter

ACCURACIES = [[0.6, 0.7, 0.75], [0.4, 0.5, 0.55], [0.3, 0.35, 0.4]]


class ScriptedPolicy:
    """The real policy's candidates, chosen in a fixed cycle of sizes (1: plain) instead of by cost."""

    def __init__(self, real, sizes):
        self.candidates, self.max_nodes = real.candidates, real.max_nodes
        by_nodes = {c.nodes: c.tree for c in real.candidates}
        self._cycle = itertools.cycle([by_nodes[n] for n in sizes])
        self.fresh_calls = 0
        self.observed: list[tuple[int, float | None]] = []

    def choose(self, rows, fresh=False, ragged=True):
        self.fresh_calls += fresh
        return next(self._cycle)

    def observe(self, rows, nodes, seconds, tokens=None, smaller=None):
        self.observed.append((nodes, tokens))


def scripted(decoder, sizes) -> ScriptedPolicy:
    decoder.tree_policy = ScriptedPolicy(decoder.tree_policy, sizes)
    return decoder.tree_policy


SIZES = [1, 4, 1, 1, 8, 2, 1, 6]  # plain first, one plain step and two between trees, sizes up and down


@pytest.mark.parametrize("arch", ["llama", "mistral_sw"])
@pytest.mark.parametrize("dynamic", [True, False])
def test_plain_steps_and_trees_of_any_size_mix_within_one_call_and_stay_exact(arch, dynamic):
    model = tiny_target(arch, seed=3)
    prompt = [5, 6, 7, 8]
    ref = hf_greedy(model, prompt, 48)
    drafter = OracleDrafter(ref, 97, 32, num_heads=3, error_rate=0.3, seed=2)
    decoder = amphista.SpeculativeDecoder(model, drafter, tree="auto", accuracies=ACCURACIES, dynamic=dynamic)
    policy = scripted(decoder, SIZES)
    out = decoder.generate(prompt, max_new_tokens=48, eos_token_id=[])
    assert out.sequences[0].tolist() == ref
    nodes = decoder.last_step_nodes
    assert len(nodes) == len(out.step_times) - 1 == len(policy.observed)
    # The first step follows the call's (fresh) choice, every later one the choice made after the step before.
    assert nodes == [n for n, _ in zip(itertools.cycle(SIZES), nodes)]
    assert [n for n, _ in policy.observed] == nodes and policy.fresh_calls == 1
    assert decoder.tree_nodes == nodes[-1]
    # Plain steps commit one token; the tree steps accepted drafts after plain ones (the oracle caught up).
    tokens = [a for n, a in zip(nodes, out.accept_lengths[1:]) if n == 1]
    assert tokens and all(a == 1 for a in tokens)
    after_plain = [a for prev, n, a in zip(nodes, nodes[1:], out.accept_lengths[2:]) if prev == 1 and n > 1]
    assert after_plain and max(after_plain) > 1


def test_a_seed_gives_plain_samplings_text_with_plain_steps_mixed_in():
    """Plain steps sample position t with the same keyed uniform as plain decoding and tree verification."""
    model = tiny_target("llama", vocab=97, seed=5, sharpen=3.0)
    drafter = RandomDrafter(97, 32, num_heads=3, seed=4)
    decoder = amphista.SpeculativeDecoder(model, drafter, tree="auto", accuracies=ACCURACIES)
    scripted(decoder, SIZES)
    plain = amphista.VanillaDecoder(model)
    kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, eos_token_id=[])
    for seed in range(6):
        out = decoder.generate([3, 9, 4], seed=seed, **kw)
        assert out.new_tokens == plain.generate([3, 9, 4], seed=seed, **kw).new_tokens
        assert 1 in decoder.last_step_nodes and max(decoder.last_step_nodes) > 1


@pytest.mark.parametrize("kind", ["amphista", "medusa"])
def test_after_plain_steps_the_drafter_has_read_every_committed_position(kind):
    """The first tree step after plain ones drafts from all the positions they committed: Amphista's SAL cache
    then equals one computed from the committed sequence alone, and drafts equal a drafter that read it whole."""
    model = tiny_target("llama", seed=3)
    target = TargetModel(model)
    torch.manual_seed(0)
    cls = AmphistaDrafter if kind == "amphista" else MedusaDrafter
    drafter = cls.for_target(target, num_heads=3)
    with torch.no_grad():
        for p in drafter.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    decoder = amphista.SpeculativeDecoder(target, drafter, tree="auto", accuracies=ACCURACIES)
    scripted(decoder, [1, 1, 1, 4])  # ends each cycle with a tree step that catches up on three plain ones
    drafts = []
    real_draft = drafter.draft_topk

    def spy(hidden, tokens, start, depth, k):
        out = real_draft(hidden, tokens, start, depth, k)
        drafts.append((start + hidden.shape[1], out.clone()))
        return out

    drafter.draft_topk = spy
    prompt = [5, 9, 14, 3]
    decoder.dynamic_trees = False  # static trees: every tree step goes through draft_topk
    out = decoder.generate(prompt, max_new_tokens=30, eos_token_id=[])
    seq = out.sequences
    assert out.sequences[0].tolist() == hf_greedy(model, prompt, 30)
    assert len(drafts) >= 3
    fresh = cls.for_target(target, num_heads=3)
    fresh.load_state_dict(drafter.state_dict())
    for read, got in drafts:  # each tree step read every committed position up to `read`
        hidden, _ = target.forward_train(seq[:, :read])
        fresh.reset(read + 8)
        want = fresh.draft_topk(hidden, seq[:, 1 : read + 1], 0, got.shape[0], got.shape[1])
        assert torch.equal(got, want)
    if kind == "amphista":
        length = drafter.cache_length
        assert length == drafts[-1][0]
        for mine, ref in zip(drafter.sal.layers, fresh.sal.layers):
            torch.testing.assert_close(
                mine.attn.kv_cache[..., :length, :], ref.attn.kv_cache[..., :length, :], atol=1e-4, rtol=1e-4
            )


def test_only_a_drafter_with_state_pays_a_margin_to_leave_plain_decoding():
    # The SWITCH margin is for the catch-up draft after plain steps: Medusa's drafts read the last position
    # only, so it has none to pay for, and its `auto` leaves plain decoding as soon as a tree pays.
    target = TargetModel(tiny_target("llama", seed=3))
    medusa, amphista_sal = MedusaDrafter.for_target(target), AmphistaDrafter.for_target(target)
    assert not medusa.keeps_state and amphista_sal.keeps_state
    assert not AmphistaDrafter.for_target(target, use_sal=False).keeps_state
    policies = {
        name: amphista.SpeculativeDecoder(target, d, tree="auto", accuracies=ACCURACIES).tree_policy
        for name, d in (("medusa", medusa), ("amphista", amphista_sal))
    }
    assert policies["medusa"].switch == 0.0 and policies["amphista"].switch == policies["amphista"].SWITCH > 0
