"""Medusa and Amphista drafters: incremental == full forward, initialisation, every switch, losslessness."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import hf_greedy, tiny_target

import amphista
from amphista import AmphistaDrafter, InputError, MedusaDrafter, TargetModel

# Every knob of AmphistaConfig, each away from its default at least once.
CONFIGS = {
    "default": {},
    "token_once": {"sal_variant": "token_once"},
    "split": {"sal_variant": "split"},
    "one_stage": {"sal_stages": 1},
    "three_stages_split": {"sal_stages": 3, "sal_variant": "split"},
    "no_sal": {"use_sal": False},
    "no_aeb": {"aeb_layers": 0},
    "aeb2_rotary": {"aeb_layers": 2, "position_embedding": "rotary"},
    "sinusoidal": {"position_embedding": "sinusoidal"},
    "no_pe": {"position_embedding": "none"},
    "shared_head": {"shared_lm_head": True},
    "shared_head_no_norm": {"shared_lm_head": True, "head_norm": False},
    "narrow": {"sal_width": 16, "aeb_width": 16, "sal_variant": "split"},
    "narrow_refuse": {"sal_width": 16, "aeb_width": 16},
    "deep_resblocks": {"resblock_layers": 2},
    "five_heads": {"num_heads": 5},
}


@pytest.fixture(scope="module")
def target():
    return TargetModel(tiny_target("llama", seed=3))


def perturb(drafter, scale=0.1, seed=0):
    """Move every trained weight away from its (partly zero) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return drafter


def make(target, kind="amphista", seed=0, **overrides):
    torch.manual_seed(seed)
    cls = AmphistaDrafter if kind == "amphista" else MedusaDrafter
    return cls.for_target(target, **overrides)


def batch(target, B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, target.vocab_size, (B, T + 1), generator=g)
    hidden, _ = target.forward_train(tokens[:, :-1])
    return hidden.clone(), tokens[:, 1:].clone()


@pytest.mark.parametrize("name", [*CONFIGS, "medusa"])
def test_incremental_equals_full_forward(target, name):
    drafter = perturb(make(target, "medusa") if name == "medusa" else make(target, **CONFIGS[name]))
    hidden, nxt = batch(target, B=1, T=23)
    with torch.no_grad():
        full = drafter(hidden, nxt)  # (1, T, K, V)
    rng = random.Random(name)
    for _ in range(2):  # reset must forget the previous sequence
        drafter.reset(64)
        pos = 0
        while pos < hidden.shape[1]:
            n = min(rng.choice([1, 1, 2, 3, 5]) if pos else rng.randint(1, 8), hidden.shape[1] - pos)
            logits = drafter.draft(hidden[:, pos : pos + n], nxt[:, pos : pos + n], pos)  # (K, V)
            pos += n
            torch.testing.assert_close(logits, full[0, pos - 1], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_untrained_amphista_equals_medusa_equals_lm_head(target, name):
    over = CONFIGS[name]
    amph = make(target, **over)
    head_over = {k: over[k] for k in ("num_heads", "shared_lm_head", "head_norm") if k in over}
    medusa = make(target, "medusa", **head_over)
    hidden, nxt = batch(target)
    with torch.no_grad():
        a, m = amph(hidden, nxt), medusa(hidden, nxt)  # (B, T, K, V)
    torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-5)
    ref = target.lm_head(hidden).unsqueeze(2).expand_as(a)
    if over.get("shared_lm_head") and over.get("head_norm", True):
        # The shared head's norm (weight 1) divides h by rms(h): same ranking, another temperature.
        rms = hidden.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt().unsqueeze(2)
        torch.testing.assert_close(a * rms, ref, atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_switch_builds_runs_and_gets_gradients(target, name):
    drafter = make(target, **CONFIGS[name])
    hidden, nxt = batch(target)
    logits = drafter(hidden, nxt)
    K = drafter.num_heads
    assert logits.shape == (*nxt.shape, K, target.vocab_size)
    assert drafter.features(hidden, nxt).shape == (*nxt.shape, K, target.hidden_size)
    logits.logsumexp(-1).mean().backward()
    params = drafter.trainable_parameters()
    assert params and all(p.grad is not None for p in params)
    drafter.reset(32)
    assert drafter.draft(hidden[:1, :5], nxt[:1, :5], 0).shape == (K, target.vocab_size)


def test_training_after_drafting_in_another_dtype(target):
    # Tables cached while drafting (inference mode) must not leak into autograd.
    drafter = make(target, dtype=torch.bfloat16, position_embedding="rotary", sal_variant="split")
    hidden, nxt = batch(target, B=1, T=6)
    drafter.reset(8)
    drafter.draft(hidden, nxt, 0)
    drafter(hidden, nxt).float().logsumexp(-1).mean().backward()
    assert drafter.resblocks.weight.grad is not None


def test_position_ids_and_right_padding(target):
    drafter = perturb(make(target))
    hidden, nxt = batch(target, B=2, T=10)
    with torch.no_grad():
        plain = drafter(hidden, nxt)
        explicit = drafter(hidden, nxt, position_ids=torch.arange(10).expand(2, 10))
        shifted = drafter(hidden, nxt, position_ids=torch.arange(10).expand(2, 10) + 7)
        alone = drafter(hidden[1:, :6], nxt[1:, :6])  # row 1 as if right-padded after 6 tokens
    torch.testing.assert_close(explicit, plain)
    torch.testing.assert_close(alone[0], plain[1, :6], atol=1e-5, rtol=1e-5)
    # RoPE makes attention depend on relative positions only: a constant shift changes nothing.
    torch.testing.assert_close(shifted, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("aeb_layers", [0, 1, 2])
def test_aeb_lets_near_heads_see_far_heads(target, aeb_layers):
    drafter = perturb(make(target, aeb_layers=aeb_layers))
    hidden, nxt = batch(target, B=1, T=6)
    with torch.no_grad():
        before = drafter(hidden, nxt)  # (1, T, K, V)
        drafter.resblocks.weight[:, 3].add_(0.5)  # change only what head 3 feeds into the AEB
        after = drafter(hidden, nxt)
    changed = (after - before).abs().amax(dim=(0, 1, 3)) > 1e-4  # (K,)
    assert changed[3]
    assert changed[:3].all() if aeb_layers else not changed[:3].any()


def test_param_groups_and_trainable_parameters(target):
    for over in ({}, {"shared_lm_head": True}):
        drafter = make(target, **over)
        groups = drafter.param_groups(head_lr=1e-2, layer_lr=3e-3)
        assert [g["name"] for g in groups] == ["heads", "layers"]
        assert [g["lr"] for g in groups] == [1e-2, 3e-3]
        grouped = [id(p) for g in groups for p in g["params"]]
        assert sorted(grouped) == sorted(id(p) for p in drafter.trainable_parameters())
        borrowed = {id(target.lm_head.weight), id(target.embed_tokens.weight)}
        assert not borrowed & {id(p) for p in drafter.parameters()}
        torch.optim.AdamW(groups)  # the groups are optimizer-ready
    assert [g["name"] for g in make(target, "medusa").param_groups()] == ["heads"]


def test_draft_errors_are_clear(target):
    drafter = make(target)
    hidden, nxt = batch(target, B=1, T=8)
    drafter.reset(6)
    with pytest.raises(InputError, match="reset"):
        drafter.draft(hidden, nxt, 0)
    drafter.reset(16)
    drafter.draft(hidden[:, :3], nxt[:, :3], 0)
    with pytest.raises(InputError, match="exactly once"):
        drafter.draft(hidden[:, 4:5], nxt[:, 4:5], 4)
    fresh = AmphistaDrafter(drafter.config)  # built from a config alone: nothing borrowed yet
    with pytest.raises(InputError, match="attach"):
        fresh(hidden, nxt)
    fresh.attach(target)
    fresh(hidden, nxt)
    with pytest.raises(InputError, match="sal_variant"):
        AmphistaDrafter.for_target(target, sal_variant="both")
    with pytest.raises(InputError, match="unknown"):
        AmphistaDrafter.for_target(target, aeb_depth=2)


def train_a_little(drafter, target, steps=4, seed=0):
    """A few AdamW steps on random sequences: head k at position t learns the token at t+2+k."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(drafter.param_groups(head_lr=1e-2, layer_lr=3e-3), weight_decay=0.0)
    K = drafter.num_heads
    for _ in range(steps):
        tokens = torch.randint(3, target.vocab_size, (4, 20), generator=g)
        hidden, _ = target.forward_train(tokens[:, :-1])
        logits = drafter(hidden.clone(), tokens[:, 1:])  # (B, T, K, V)
        loss = sum(
            torch.nn.functional.cross_entropy(logits[:, : 19 - 1 - k, k].flatten(0, 1), tokens[:, 2 + k :].flatten())
            for k in range(K)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return drafter


@pytest.mark.parametrize("trained", [False, True], ids=["untrained", "trained"])
@pytest.mark.parametrize("kind", ["medusa", "amphista"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_decoding_is_lossless(arch, kind, trained):
    model = tiny_target(arch, seed=5)
    target = TargetModel(model)
    drafter = make(target, kind, seed=1, dtype=torch.float32)
    if trained:
        train_a_little(drafter, target)
    rng = random.Random(f"{arch}{kind}{trained}")
    for _ in range(2):
        prompt = [rng.randrange(3, target.vocab_size) for _ in range(rng.randint(1, 10))]
        max_new = rng.randint(20, 40)
        out = amphista.SpeculativeDecoder(model, drafter, tree="mc_sim_7b_63").generate(prompt, max_new_tokens=max_new)
        assert out.sequences[0].tolist() == hf_greedy(model, prompt, max_new)


def test_sal_cache_holds_exactly_the_committed_positions(target):
    drafter = perturb(make(target), scale=0.05)  # a poor drafter: many tree nodes get rejected
    prompt = [5, 9, 14, 3]
    out = amphista.SpeculativeDecoder(target, drafter, tree="mc_sim_7b_63").generate(
        prompt, max_new_tokens=40, eos_token_id=[]
    )
    seq = out.sequences  # (1, S)
    assert any(a < 5 for a in out.accept_lengths[1:]), "expected rejections to make the test meaningful"
    # The last draft call ran before the final step: every committed position but the last step's.
    L = seq.shape[1] - out.accept_lengths[-1] - 1
    assert drafter.cache_length == L
    # Recompute the cache from the committed sequence alone: a rejected node would show up as a difference.
    hidden, _ = target.forward_train(seq[:, :L])
    fresh = make(target)
    fresh.load_state_dict(drafter.state_dict())
    fresh.reset(L)
    fresh.draft(hidden, seq[:, 1 : L + 1], 0)
    for mine, ref in zip(drafter.sal.layers, fresh.sal.layers):
        torch.testing.assert_close(mine.attn.kv_cache[..., :L, :], ref.attn.kv_cache[..., :L, :], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_rms_norm_equals_nn_rmsnorm(dtype):
    from amphista.drafters.layers import _norm, _norm_constants, rms_norm

    norm = torch.nn.RMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0] *= 1e-3  # where eps matters
    x[1, 0] = 0.0
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    ref = norm(x)
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.eps), ref, atol=tol, rtol=tol)  # training
    with torch.inference_mode():  # drafting's formula, with sqrt(d) folded into the weight as at reset
        c, sqrt_d = _norm_constants(64, norm.eps, x.device, dtype)
        torch.testing.assert_close(_norm(x, norm.weight * sqrt_d, c), ref, atol=tol, rtol=tol)


def test_drafting_weights_are_gathered_at_reset(target):
    drafter = perturb(make(target, aeb_layers=2))
    hidden, nxt = batch(target, B=1, T=6)
    with pytest.raises(InputError, match="reset"):
        drafter.draft(hidden, nxt, 0)  # never reset: the drafting weights were never gathered
    drafter.reset(8)
    drafter.draft(hidden, nxt, 0)
    perturb(drafter, seed=1)  # as an optimizer step would: drafting reads the weights as of the last reset
    drafter.reset(8)
    with torch.no_grad():
        torch.testing.assert_close(drafter.draft(hidden, nxt, 0), drafter(hidden, nxt)[0, -1], atol=2e-5, rtol=1e-5)
    drafter.double()  # new parameters: the views gathered at reset would read the old ones
    with pytest.raises(InputError, match="reset"):
        drafter.draft(hidden.double(), nxt, 0)
    drafter.reset(8)
    with torch.no_grad():
        ref = drafter(hidden.double(), nxt)[0, -1]
    torch.testing.assert_close(drafter.draft(hidden.double(), nxt, 0), ref)
