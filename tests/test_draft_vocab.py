"""Reduced draft vocabularies: the heads rank N << V tokens and d2t maps them back to the target's ids.

Verification never looks at the draft vocabulary, so decoding must stay exactly the target's; what a
draft vocabulary may change is only which tokens get proposed, and the training loss and accuracies must
treat a label outside it as one the drafter cannot propose.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_greedy
from conftest import tiny_target as hf_tiny_target
from safetensors.torch import load_file, save_file
from test_training_helpers import config, tiny_target, tokenizer, write_chats, write_stories

import amphista
from amphista import (
    AmphistaDrafter,
    CheckpointError,
    DrafterMismatchError,
    InputError,
    MedusaDrafter,
    TargetModel,
)
from amphista.drafters.vocab import count_tokens, draft_vocab_from_counts, draft_vocab_from_tokens
from amphista.training import DraftLoss, apply_overrides, head_weights, load_examples, target_probs, train
from amphista.training.evaluate import head_accuracy
from amphista.training.trainer import build_drafter

KINDS = {"medusa": MedusaDrafter, "amphista": AmphistaDrafter}


def _perturb(drafter, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return drafter


@pytest.fixture(scope="module")
def llama():
    return TargetModel(hf_tiny_target("llama", seed=1))


def _d2t(n=24, vocab=97):
    # Ids spread over the whole vocabulary, EOS (2) among them, in no particular order of frequency.
    return torch.tensor(sorted({2, *range(3, vocab, vocab // (n - 1))}))[:n]


def _hidden(target, T=9, seed=0):
    tokens = torch.randint(3, target.vocab_size, (1, T + 1), generator=torch.Generator().manual_seed(seed))
    hidden, _ = target.forward_train(tokens[:, :-1])
    return hidden.clone(), tokens[:, 1:]


# ---- choosing the tokens ------------------------------------------------------------------------------


def test_most_frequent_ids_ties_to_the_smaller_id_and_eos_always_kept():
    counts = torch.tensor([0, 5, 0, 9, 5, 5, 1, 9, 0, 2])
    # 3 and 7 (9 each), then the 5s: 1, 4, 5 in id order; EOS 2 was never seen but is kept.
    assert draft_vocab_from_counts(counts, 4).tolist() == [1, 3, 4, 7]
    assert draft_vocab_from_counts(counts, 4, keep=[2]).tolist() == [1, 2, 3, 7]
    assert draft_vocab_from_counts(counts, 6, keep=[2]).tolist() == [1, 2, 3, 4, 5, 7]
    # A permutation of the same counts over the same ids gives the same choice: nothing depends on order.
    seqs = [[3, 3, 7, 1], [7, 4, 3], [5, 1]]
    assert (
        draft_vocab_from_tokens(seqs, 3, 10).tolist() == draft_vocab_from_tokens(seqs[::-1], 3, 10).tolist()
    )
    assert count_tokens(seqs, 10).tolist() == [0, 2, 0, 3, 1, 1, 0, 2, 0, 0]
    # Fewer distinct tokens than n: unseen ids fill up, smallest first.
    assert draft_vocab_from_tokens([[9, 9]], 3, 10, keep=[2]).tolist() == [0, 2, 9]


@pytest.mark.parametrize(
    "n, keep, match",
    [(0, (), "draft_vocab_size"), (10, (), "draft_vocab_size"), (True, (), "draft_vocab_size"),
     (1, (2, 3), "cannot hold"), (3, (12,), "outside")],
)  # fmt: skip
def test_bad_choices_are_refused(n, keep, match):
    with pytest.raises(InputError, match=match):
        draft_vocab_from_counts(torch.ones(10), n, keep)


def test_config_checks_the_size(llama):
    for bad in (-1, llama.vocab_size, 2.5, True):
        with pytest.raises(InputError, match="draft_vocab_size"):
            amphista.MedusaConfig.from_target(llama, draft_vocab_size=bad)
    with pytest.raises(InputError, match="needs the kept tokens"):
        MedusaDrafter.for_target(llama, draft_vocab_size=8)
    with pytest.raises(InputError, match="holds 24"):
        MedusaDrafter.for_target(llama, d2t=_d2t(), draft_vocab_size=8)
    with pytest.raises(InputError, match="twice"):
        MedusaDrafter.for_target(llama, d2t=[2, 5, 5])
    with pytest.raises(InputError, match="outside"):
        MedusaDrafter.for_target(llama, d2t=[2, 5, 97])


def test_full_vocabulary_drafters_are_unchanged(llama):
    """No d2t in the state dict: every existing checkpoint keeps loading strictly."""
    for cls in KINDS.values():
        drafter = cls.for_target(llama)
        assert drafter.d2t is None and "d2t" not in drafter.state_dict()
        assert drafter.config.draft_vocab_size == 0


# ---- the heads ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shared", [False, True])
def test_reduced_heads_are_the_full_heads_rows(llama, kind, shared):
    """Untrained separate heads start as the target's lm_head rows for d2t; shared heads read those rows."""
    d2t = _d2t()
    full = KINDS[kind].for_target(llama, shared_lm_head=shared)
    reduced = KINDS[kind].for_target(llama, shared_lm_head=shared, d2t=d2t)
    if not shared:
        torch.testing.assert_close(reduced.vocab.weight, full.vocab.weight[:, d2t], atol=0, rtol=0)
    # Trained weights: the reduced drafter given the full one's weights, its heads cut to the d2t rows.
    state = _perturb(full, seed=4).state_dict()
    if not shared:
        state["vocab.weight"] = state["vocab.weight"][:, d2t]
    reduced.load_state_dict({**state, "d2t": d2t})
    hidden, nxt = _hidden(llama)
    with torch.no_grad():
        q = reduced(hidden, nxt)
        torch.testing.assert_close(q, full(hidden, nxt)[..., d2t])
    assert q.shape[-1] == len(d2t)
    if not shared:
        assert reduced.vocab.weight.shape == (reduced.num_heads, len(d2t), llama.hidden_size)


@pytest.mark.parametrize("kind", list(KINDS))
def test_drafts_are_target_ids_inside_d2t(llama, kind):
    d2t = _d2t()
    drafter = _perturb(KINDS[kind].for_target(llama, d2t=d2t), scale=0.2)
    hidden, nxt = _hidden(llama)
    drafter.reset(32)
    logits = drafter.draft(hidden[:, :6], nxt[:, :6], 0)  # (K, V)
    assert logits.shape == (drafter.num_heads, llama.vocab_size)
    outside = torch.ones(llama.vocab_size, dtype=torch.bool)
    outside[d2t] = False
    assert torch.isneginf(logits[:, outside]).all() and torch.isfinite(logits[:, d2t]).all()
    drafter.reset(32)
    top = drafter.draft_topk(hidden[:, :6], nxt[:, :6], 0, depth=3, k=5)
    assert top.shape == (3, 5) and torch.isin(top, d2t).all()
    assert top.tolist() == torch.topk(logits[:3], 5, dim=-1).indices.tolist()
    with pytest.raises(InputError, match="draft vocabulary has 24"):
        drafter.draft_topk(hidden[:, 6:7], nxt[:, 6:7], 6, depth=2, k=25)


def test_base_draft_topk_is_topk_of_draft(llama):
    drafter = amphista.drafters.RandomDrafter(llama.vocab_size, llama.hidden_size, num_heads=4)
    hidden, nxt = _hidden(llama)
    drafter.generator.manual_seed(3)
    top = drafter.draft_topk(hidden, nxt, 0, 2, 3)
    drafter.generator.manual_seed(3)
    assert top.tolist() == torch.topk(drafter.draft(hidden, nxt, 0)[:2], 3).indices.tolist()


# ---- decoding stays the target's --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shared", [False, True])
def test_greedy_equals_generate_with_a_reduced_vocabulary(kind, shared):
    model = hf_tiny_target("llama", seed=1)
    prompt = [5, 17, 33, 8]
    ref = hf_greedy(model, prompt, 30)
    # The reference's own tokens in the draft vocabulary, so that some drafts can be accepted.
    d2t = torch.tensor(sorted({2, *ref, *range(40, 60)}))
    target = TargetModel(model)
    drafter = _perturb(KINDS[kind].for_target(target, shared_lm_head=shared, d2t=d2t), seed=1)
    proposed = []
    draft_topk = drafter.draft_topk

    def recording(*args):
        top = draft_topk(*args)  # what the decoder builds its tree from
        proposed.append(top)
        return top

    drafter.draft_topk = recording
    built = amphista.build_tree([[0.6, 0.75, 0.8], [0.4, 0.55, 0.6], [0.3, 0.4, 0.45], [0.2, 0.3, 0.35]], 12)
    for tree in ("chain", "mc_sim_7b_63", built):
        out = amphista.SpeculativeDecoder(target, drafter, tree=tree).generate(prompt, max_new_tokens=30)
        assert out.sequences[0].tolist() == ref, tree
    assert proposed and all(torch.isin(p, d2t).all() for p in proposed)


def test_sampling_keeps_the_target_distribution_with_a_reduced_vocabulary():
    from test_sampling import P_MIN, VOCAB, _chi2_pvalue, _draw, _exact_joint

    from amphista.sampling import SamplingParams

    model = hf_tiny_target("llama", vocab=VOCAB, seed=5, sharpen=60.0)
    target = TargetModel(model)
    # Half the vocabulary: the target's likely tokens are partly outside it, so rejections happen.
    drafter = _perturb(MedusaDrafter.for_target(target, num_heads=3, d2t=[0, 2, 5, 7]), seed=2, scale=0.5)
    dec = amphista.SpeculativeDecoder(target, drafter, tree=[[0], [1], [2], [0, 0], [0, 1], [1, 0]])
    params = SamplingParams(1.0)
    draws = 600  # as many as test_sampling's check that catches a lossy verifier
    counts = _draw(dec, params, draws)
    assert _chi2_pvalue(counts, _exact_joint(model, params), draws) > P_MIN


# ---- saving and loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_gives_identical_drafts(llama, tmp_path, kind):
    d2t = _d2t()
    drafter = _perturb(KINDS[kind].for_target(llama, shared_lm_head=kind == "amphista", d2t=d2t))
    drafter.save_pretrained(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "config.json").read_text())
    assert meta["config"]["draft_vocab_size"] == len(d2t)
    assert load_file(tmp_path / "d" / "model.safetensors")["d2t"].tolist() == d2t.tolist()
    assert "draft vocabulary" in (tmp_path / "d" / "README.md").read_text()
    loaded = amphista.load_drafter(tmp_path / "d", target=llama)
    assert loaded.d2t.tolist() == d2t.tolist()
    hidden, nxt = _hidden(llama)
    for d in (drafter, loaded):
        d.reset(32)
    torch.testing.assert_close(loaded.draft(hidden, nxt, 0), drafter.draft(hidden, nxt, 0))
    assert loaded.draft_topk(hidden[:, -1:], nxt[:, -1:], 9, 4, 3).tolist() == drafter.draft_topk(
        hidden[:, -1:], nxt[:, -1:], 9, 4, 3).tolist()  # fmt: skip


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda d: d.clone().fill_(3), "twice"),
        (lambda d: torch.cat([d[:-1], torch.tensor([97])]), "outside the target's vocabulary"),
        (lambda d: d[:-1].clone(), "does not match"),
        (lambda d: d.float(), "int64"),
    ],
)
def test_corrupt_d2t_is_refused(llama, tmp_path, corrupt, match):
    MedusaDrafter.for_target(llama, d2t=_d2t()).save_pretrained(tmp_path / "d")
    weights = tmp_path / "d" / "model.safetensors"
    tensors = load_file(weights)
    tensors["d2t"] = corrupt(tensors["d2t"])
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=match):
        amphista.load_drafter(tmp_path / "d", target=llama)


def test_another_target_is_refused(llama, tmp_path):
    MedusaDrafter.for_target(llama, d2t=_d2t()).save_pretrained(tmp_path / "d")
    other = TargetModel(hf_tiny_target("llama", vocab=120, seed=1))
    with pytest.raises(DrafterMismatchError, match="vocabulary of 97"):
        amphista.load_drafter(tmp_path / "d", target=other)


# ---- training -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_loss_ignores_labels_outside_the_draft_vocabulary(kind):
    """LM term over in-vocabulary labels only; alignment to the target's distribution renormalised over d2t;
    both divided by every labelled position (the normaliser the trainer passes)."""
    target = tiny_target()
    K, lm_w, al_w = 3, 0.7, 0.4
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    # Every other label token kept, plus unrelated ids: both kinds of label occur.
    labels_seen = sorted(set(ids[:, 2:].flatten().tolist()))
    d2t = torch.tensor(sorted({2, *labels_seen[::2], *range(100, 140)}))
    drafter = _perturb(KINDS[kind].for_target(target, num_heads=K, dtype=torch.float32, d2t=d2t))
    hidden, logits = target.forward_train(ids)
    hidden, logp = hidden.clone(), F.log_softmax(logits, -1)
    kept = {int(x): i for i, x in enumerate(d2t)}

    w = head_weights(K, "decay", 0.8)
    expected, n_in, n_out = torch.zeros(()), 0, 0
    with torch.no_grad():
        q = drafter(hidden[:, :-1], ids[:, 1:])  # (B, T-1, K, N)
    for k in range(K):
        lm, al, n = 0.0, 0.0, 0
        for b in range(2):
            for t in range(9 - 2 - k):
                label = t + 2 + k
                if not mask[b, label]:
                    continue
                logq = F.log_softmax(q[b, t, k], -1)
                token = int(ids[b, label])
                if token in kept:
                    lm += -logq[kept[token]]
                    n_in += 1
                else:
                    n_out += 1
                p = F.softmax(logits[b, t + 1 + k, d2t], -1)  # the target's logits over the kept tokens
                al += -(p * logq).sum()
                n += 1
        expected += w[k] * (lm_w * lm + al_w * al) / n
    assert n_in and n_out
    norm = torch.tensor([float(mask[:, 2 + k :].sum()) for k in range(K)])
    for chunk, columns in ((0, logp), (4, logp), (0, logp[..., d2t])):  # chunked; a cache of N columns
        probs = target_probs(columns, drafter.d2t)
        loss, stats = DraftLoss(drafter, w, lm_w, al_w, chunk=chunk)(hidden, ids, mask, probs, norm)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        assert stats[3].tolist() == norm.tolist()  # out-of-vocabulary labels still count as labels
        loss.backward()
        drafter.zero_grad()


def test_head_accuracy_counts_labels_outside_the_vocabulary_as_misses(tmp_path):
    target = tiny_target()
    examples, _ = load_examples([write_stories(tmp_path / "s.jsonl", n=6)], tokenizer(), seq_len=48)
    used = {t for ex in examples for t in ex.input_ids}
    unused = [i for i in range(3, 512) if i not in used][:20]
    drafter = MedusaDrafter.for_target(target, num_heads=3, d2t=unused)
    full = head_accuracy(MedusaDrafter.for_target(target, num_heads=3), target, examples, batch_size=4)
    result = head_accuracy(drafter, target, examples, batch_size=4)
    assert result["positions"] == full["positions"] and result["draft_vocab_size"] == 20
    assert all(x == 0 for row in result["top_k"] for x in row)
    assert result["label_coverage"] == [0.0] * 3
    # Every token of the data kept: the same heads' rows, fewer competitors, so never fewer hits.
    drafter = MedusaDrafter.for_target(target, num_heads=3, d2t=sorted(used))
    result = head_accuracy(drafter, target, examples, batch_size=4)
    assert result["label_coverage"] == [1.0] * 3
    assert all(r >= f for a, b in zip(result["top_k"], full["top_k"]) for r, f in zip(a, b))


def test_build_drafter_counts_the_training_labels(tmp_path):
    target = tiny_target()
    data = write_chats(tmp_path / "c.jsonl", n=16)  # prompts are not labels: their tokens must not count
    cfg = apply_overrides(config(tmp_path, [data]), ["draft_vocab_size=40", "num_heads=3"])
    examples, _ = load_examples([data], tokenizer(), 64)
    labels = [[t for t, m in zip(ex.input_ids, ex.loss_mask) if m] for ex in examples]
    expected = draft_vocab_from_tokens(labels, 40, 512, [2]).tolist()
    assert build_drafter(cfg, target, examples).d2t.tolist() == expected
    assert build_drafter(cfg, target).d2t.tolist() == expected  # without examples: those of cfg.data
    assert build_drafter(cfg, target, examples[:2]).d2t.tolist() != expected
    everything = draft_vocab_from_tokens([ex.input_ids for ex in examples], 40, 512, [2]).tolist()
    assert everything != expected  # the data really has prompt tokens that would change the choice
    with pytest.raises(InputError, match="draft_vocab_size"):
        build_drafter(apply_overrides(config(tmp_path, [data]), ["draft_vocab_size=600"]), target)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_short_training_run_with_a_draft_vocabulary(tmp_path, kind):
    target = tiny_target()
    data = write_stories(tmp_path / "s.jsonl", n=32)
    cfg = apply_overrides(config(tmp_path, [data], drafter=kind, max_steps=6), ["draft_vocab_size=48"])
    result = train(cfg, target=target)
    assert result.steps == 6 and result.loss == result.loss  # finite: not NaN
    assert (
        result.head_accuracy["draft_vocab_size"] == 48 and min(result.head_accuracy["label_coverage"]) > 0.9
    )
    drafter = amphista.load_drafter(tmp_path / "out", target=target)
    assert drafter.config.draft_vocab_size == 48 and 2 in drafter.d2t.tolist()
    prompt = target.tokenizer("Once upon a time")["input_ids"]
    ref = amphista.VanillaDecoder(target).generate(prompt, max_new_tokens=20, eos_token_id=[]).new_tokens
    out = amphista.SpeculativeDecoder(target, drafter, tree="chain").generate(
        prompt, max_new_tokens=20, eos_token_id=[]
    )
    assert out.new_tokens == ref
