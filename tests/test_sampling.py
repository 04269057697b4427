"""Speculative sampling preserves the target's distribution (chi-square against exact probabilities)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_target

import amphista
import amphista.batch
from amphista import verify as verify_mod
from amphista.drafters import OracleDrafter, RandomDrafter
from amphista.sampling import SamplingParams, target_probs

VOCAB = 8
PROMPT = [3, 5]
DRAWS = 1500
P_MIN = 1e-3  # reject "same distribution" below this p-value; fixed seeds make the test deterministic


def _exact_joint(model, params: SamplingParams) -> dict[tuple[int, int], float]:
    """P(first two generated tokens) by enumeration, with the same logits processing as decoding."""
    with torch.no_grad():
        p1 = target_probs(model(torch.tensor([PROMPT])).logits[0, -1], params)  # (V,)
        seqs = torch.tensor([PROMPT + [a] for a in range(VOCAB)])
        p2 = target_probs(model(seqs).logits[:, -1], params)  # (V, V)
    return {(a, b): float(p1[a] * p2[a, b]) for a, b in itertools.product(range(VOCAB), repeat=2)}


def _chi2_pvalue(counts: dict, probs: dict, n: int) -> float:
    # Pool cells with small expectations so the chi-square approximation holds.
    cells = sorted(probs, key=lambda c: probs[c], reverse=True)
    stat, dof, pool_obs, pool_exp = 0.0, -1, 0.0, 0.0
    for c in cells:
        exp = probs[c] * n
        if exp >= 5:
            stat += (counts.get(c, 0) - exp) ** 2 / exp
            dof += 1
        else:
            pool_obs += counts.get(c, 0)
            pool_exp += exp
    if pool_exp > 0:
        stat += (pool_obs - pool_exp) ** 2 / max(pool_exp, 1e-9)
        dof += 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))


def _draw(decoder, params: SamplingParams, n: int, **kw) -> dict:
    counts: dict = {}
    for seed in range(n):
        out = decoder.generate(PROMPT, max_new_tokens=2, temperature=params.temperature, top_p=params.top_p,
                               top_k=params.top_k, seed=seed, eos_token_id=[], **kw)
        key = tuple(out.new_tokens)
        counts[key] = counts.get(key, 0) + 1
    return counts


def _count_accepted(monkeypatch, module) -> list[int]:
    """Route `module`'s sampled verification through a wrapper; the list fills with accepted drafts per step."""
    accepted = []

    def counting(*args):
        nodes, idx, bonus = verify_mod.verify_sampling(*args)
        accepted.append(len(nodes) - 1)
        return nodes, idx, bonus

    monkeypatch.setattr(module, "verify_sampling", counting)
    return accepted


@pytest.fixture(scope="module")
def model():
    return tiny_target("llama", vocab=VOCAB, seed=5, sharpen=60.0)


def _good_drafter(model):
    # Proposes the target's most likely continuation: many drafts get accepted.
    with torch.no_grad():
        a = int(model(torch.tensor([PROMPT])).logits[0, -1].argmax())
        b = int(model(torch.tensor([PROMPT + [a]])).logits[0, -1].argmax())
        c = int(model(torch.tensor([PROMPT + [a, b]])).logits[0, -1].argmax())
    return OracleDrafter(PROMPT + [a, b, c], VOCAB, 32, num_heads=3)


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, top_p=0.9, top_k=5)])
@pytest.mark.parametrize("kind, dynamic", [("good", False), ("bad", False), ("good", True), ("bad", True)])
def test_speculative_sampling_matches_target_distribution(model, params, kind, dynamic, monkeypatch):
    exact = _exact_joint(model, params)
    drafter = _good_drafter(model) if kind == "good" else RandomDrafter(VOCAB, 32, num_heads=3, seed=1)
    tree = [[0], [1], [2], [0, 0], [0, 1], [1, 0]]
    dec = amphista.SpeculativeDecoder(model, drafter, tree=tree, dynamic=dynamic)
    accepted = _count_accepted(monkeypatch, amphista.decoder)
    counts = _draw(dec, params, DRAWS)
    assert _chi2_pvalue(counts, exact, DRAWS) > P_MIN
    # Both regimes must really be exercised: drafts accepted often (good) or rarely (bad). A dynamic tree
    # spends a hesitant drafter's nodes on its first head, 6 of this vocabulary's 8 tokens: often accepted.
    rate = sum(a > 0 for a in accepted) / len(accepted)
    assert rate > 0.5 if kind == "good" or dynamic else rate < 0.5


def test_vanilla_sampling_matches_target_distribution(model):
    params = SamplingParams(1.0)
    counts = _draw(amphista.VanillaDecoder(model), params, DRAWS)
    assert _chi2_pvalue(counts, _exact_joint(model, params), DRAWS) > P_MIN


def test_the_chi_square_check_catches_a_lossy_verifier(model, monkeypatch):
    """A verifier that accepts every top-1 draft skews the distribution; the same check must reject it."""
    params = SamplingParams(1.0)

    def accept_everything(tokens, logits, buf, params, sampler, start):
        nodes = [0]
        while buf.children[nodes[-1]]:
            nodes.append(buf.children[nodes[-1]][0])
        probs = target_probs(logits[nodes[-1]], params)
        return nodes, torch.tensor(nodes), sampler.draw(probs, start + len(nodes))

    monkeypatch.setattr(verify_mod, "verify_sampling", accept_everything)
    monkeypatch.setattr(amphista.decoder, "verify_sampling", accept_everything)
    dec = amphista.SpeculativeDecoder(model, _good_drafter(model), tree=[[0], [0, 0]])
    counts = _draw(dec, params, 600)
    assert _chi2_pvalue(counts, _exact_joint(model, params), 600) < P_MIN


def test_typical_acceptance_runs_and_is_opt_in(model):
    dec = amphista.SpeculativeDecoder(model, _good_drafter(model), tree=[[0], [1], [0, 0]])
    out = dec.generate(PROMPT, max_new_tokens=6, temperature=0.7, acceptance="typical", seed=0, eos_token_id=[])
    assert out.num_new_tokens == 6
    with pytest.raises(amphista.InputError, match="acceptance"):
        dec.generate(PROMPT, max_new_tokens=6, temperature=0.7, acceptance="loose")


def test_same_seed_same_output(model):
    dec = amphista.SpeculativeDecoder(model, RandomDrafter(VOCAB, 32, num_heads=3), tree="chain")
    a = dec.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=7).new_tokens
    b = dec.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=7).new_tokens
    assert a == b


# --- batches -------------------------------------------------------------------------------------------------

OTHER = [4, 1, 6, 2, 7]  # a longer prompt sharing the batch: ragged rows, not counted


def _draw_batched(decoder, params: SamplingParams, n: int, rows: int = 8) -> dict:
    """n draws of PROMPT's first two tokens, `rows` PROMPT rows per call interleaved with OTHER rows."""
    counts: dict = {}
    prompts = [PROMPT if i % 2 == 0 else OTHER for i in range(2 * rows)]
    for call in range(-(-n // rows)):
        outs = decoder.generate_batch(prompts, max_new_tokens=2, temperature=params.temperature, top_p=params.top_p,
                                      top_k=params.top_k, seed=call * len(prompts), eos_token_id=[])  # fmt: skip
        for out in outs[0::2]:
            key = tuple(out.new_tokens)
            counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("kind", ["good", "bad", "vanilla"])
def test_batched_sampling_matches_target_distribution(model, kind, monkeypatch):
    params = SamplingParams(0.7, top_p=0.9, top_k=5)
    if kind == "vanilla":
        dec = amphista.VanillaDecoder(model)
    else:
        drafter = _good_drafter(model) if kind == "good" else RandomDrafter(VOCAB, 32, num_heads=3, seed=1)
        dec = amphista.SpeculativeDecoder(model, drafter, tree=[[0], [1], [2], [0, 0], [0, 1], [1, 0]])
    accepted = _count_accepted(monkeypatch, amphista.batch)
    counts = _draw_batched(dec, params, DRAWS)
    assert _chi2_pvalue(counts, _exact_joint(model, params), sum(counts.values())) > P_MIN
    if kind != "vanilla":
        rate = sum(a > 0 for a in accepted) / len(accepted)
        assert rate > 0.3 if kind == "good" else rate < 0.5


def test_the_chi_square_check_catches_a_lossy_verifier_in_batches(model, monkeypatch):
    params = SamplingParams(1.0)

    def accept_everything(tokens, logits, buf, params, sampler, start):
        nodes = [0]
        while buf.children[nodes[-1]]:
            nodes.append(buf.children[nodes[-1]][0])
        probs = target_probs(logits[nodes[-1]], params)
        return nodes, torch.tensor(nodes), sampler.draw(probs, start + len(nodes))

    monkeypatch.setattr(amphista.batch, "verify_sampling", accept_everything)
    dec = amphista.SpeculativeDecoder(model, _good_drafter(model), tree=[[0], [0, 0]])
    counts = _draw_batched(dec, params, 600)
    assert _chi2_pvalue(counts, _exact_joint(model, params), sum(counts.values())) < P_MIN


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, top_p=0.9, top_k=5)])
def test_a_seed_gives_plain_samplings_text_whatever_the_tree_or_batch(model, params):
    """The target samples position t with a uniform keyed by (seed, t); a draft is accepted when it is that
    sample. So speculative, batched and plain sampling agree token for token for one seed."""
    kw = dict(max_new_tokens=12, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
              eos_token_id=[])  # fmt: skip
    plain = amphista.VanillaDecoder(model)
    decoders = [
        amphista.SpeculativeDecoder(model, _good_drafter(model), tree=[[0], [1], [0, 0]]),
        amphista.SpeculativeDecoder(model, RandomDrafter(VOCAB, 32, num_heads=3, seed=2), tree="chain"),
        amphista.SpeculativeDecoder(model, _good_drafter(model), tree=[[0], [1], [0, 0]], dynamic=True),
    ]
    for seed in range(12):
        ref = plain.generate(PROMPT, seed=seed, **kw).new_tokens
        for dec in decoders:
            assert dec.generate(PROMPT, seed=seed, **kw).new_tokens == ref
    batch = decoders[0].generate_batch([PROMPT, OTHER, PROMPT], seed=40, **kw)  # row i: seed 40 + i
    assert batch[0].new_tokens == plain.generate(PROMPT, seed=40, **kw).new_tokens
    assert batch[1].new_tokens == plain.generate(OTHER, seed=41, **kw).new_tokens
    assert batch[2].new_tokens == plain.generate(PROMPT, seed=42, **kw).new_tokens


def test_rows_drawn_together_equal_rows_drawn_one_by_one(monkeypatch):
    from amphista.sampling import PositionSampler, sample_rows

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, VOCAB, generator=g) * 3
    params = SamplingParams(0.8, top_p=0.9, top_k=7)
    samplers, positions = [PositionSampler(seed) for seed in range(6)], [5, 9, 9, 40, 2, 17]
    one_by_one = [s.draw(target_probs(logits[i], params), p) for i, (s, p) in enumerate(zip(samplers, positions))]
    assert sample_rows(logits, params, samplers, positions) == one_by_one
    # A uniform of 1.0 rounds onto the CDF's last step: both take the last token the distribution keeps.
    monkeypatch.setattr(PositionSampler, "uniform", lambda self, position: 1.0)
    last = [int(torch.nonzero(target_probs(row, params) > 0)[-1]) for row in logits]
    assert sample_rows(logits, params, samplers, positions) == last
    assert [s.draw(target_probs(logits[i], params), 0) for i, s in enumerate(samplers)] == last
