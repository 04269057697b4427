"""Speculative greedy output equals `generate(do_sample=False)` token for token."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import ARCHS, hf_greedy, tiny_target

import amphista
from amphista.drafters import AdversarialDrafter, OracleDrafter, RandomDrafter


def _trees(num_heads):
    built = amphista.build_tree([[0.6, 0.75, 0.8], [0.4, 0.55, 0.6], [0.3, 0.4, 0.45], [0.2, 0.3, 0.35]], 12)
    return ["chain", "mc_sim_7b_63", built]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_generate_every_arch_tree_and_drafter(arch):
    model = tiny_target(arch, seed=1)
    rng = random.Random(arch)
    for trial in range(3):
        prompt = [rng.randrange(3, model.config.vocab_size) for _ in range(rng.randint(1, 12))]
        max_new = rng.randint(1, 48)
        ref = hf_greedy(model, prompt, max_new)
        drafters = [
            OracleDrafter(ref, model.config.vocab_size, 32, num_heads=4, error_rate=0.0, seed=trial),
            OracleDrafter(ref, model.config.vocab_size, 32, num_heads=4, error_rate=0.4, seed=trial),
            RandomDrafter(model.config.vocab_size, 32, num_heads=4, seed=trial),
            AdversarialDrafter(ref, model.config.vocab_size, 32, num_heads=4, seed=trial),
        ]
        for drafter in drafters:
            for tree in _trees(4):
                out = amphista.SpeculativeDecoder(model, drafter, tree=tree).generate(prompt, max_new_tokens=max_new)
                assert out.sequences[0].tolist() == ref, (arch, type(drafter).__name__, tree, prompt)
                assert sum(out.accept_lengths) == out.num_new_tokens
                assert all(1 <= a <= 5 for a in out.accept_lengths)


def test_perfect_drafter_accepts_full_depth(llama):
    prompt = [5, 6, 7]
    ref = hf_greedy(llama, prompt, 41)
    drafter = OracleDrafter(ref, 97, 32, num_heads=4)
    out = amphista.SpeculativeDecoder(llama, drafter, tree="chain").generate(prompt, max_new_tokens=41,
                                                                            eos_token_id=[])
    assert out.sequences[0].tolist() == ref
    # prefill gives 1 token, then every step accepts 4 drafted tokens + the bonus
    assert out.accept_lengths == [1] + [5] * 8
    assert out.tau == pytest.approx(41 / 9)


def test_adversarial_children_under_rejected_parent_are_never_accepted(llama):
    prompt = [9, 10]
    ref = hf_greedy(llama, prompt, 30)
    # Head 0 is always wrong and the chain has no rank-1 sibling: nothing can be accepted.
    out = amphista.SpeculativeDecoder(llama, AdversarialDrafter(ref, 97, 32), tree="chain").generate(
        prompt, max_new_tokens=30, eos_token_id=[])
    assert out.sequences[0].tolist() == ref
    assert out.accept_lengths == [1] * 30


def test_vanilla_generate_equals_hf(llama):
    for prompt in ([1], [4, 8, 15, 16, 23, 42]):
        ref = hf_greedy(llama, prompt, 33)
        out = amphista.vanilla_generate(llama, prompt, max_new_tokens=33)
        assert out.sequences[0].tolist() == ref
        assert out.tau == 1.0


def test_stream_yields_the_generated_tokens(llama):
    prompt = [3, 4, 5]
    ref = hf_greedy(llama, prompt, 25)
    dec = amphista.SpeculativeDecoder(llama, OracleDrafter(ref, 97, 32, error_rate=0.3), tree="mc_sim_7b_63")
    chunks = list(dec.stream(torch.tensor([prompt]), max_new_tokens=25))
    assert [t for c in chunks for t in c] == ref[len(prompt):]
    assert [len(c) for c in chunks] == dec.last_output.accept_lengths


def test_drafter_sees_only_committed_positions(llama):
    prompt = [3, 4, 5, 6]
    ref = hf_greedy(llama, prompt, 30)
    drafter = OracleDrafter(ref, 97, 32, error_rate=0.5, seed=3)
    out = amphista.SpeculativeDecoder(llama, drafter, tree="mc_sim_7b_63").generate(prompt, max_new_tokens=30,
                                                                                   eos_token_id=[])
    # Prefill covers the prompt, then each call appends exactly the positions committed by the previous step.
    assert drafter.calls[0] == (0, len(prompt))
    pos = len(prompt)
    for (start, n), committed in zip(drafter.calls[1:], out.accept_lengths[1:]):
        assert (start, n) == (pos, committed)
        pos += n
