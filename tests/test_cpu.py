"""oneDNN-packed linear layers on the CPU: same results, exact speculation, safe fallbacks."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_greedy, tiny_target

import amphista
from amphista.cpu import ENV, PackedLinear, available, pack_linears, unpack_linears
from amphista.drafters import OracleDrafter, RandomDrafter

pytestmark = pytest.mark.skipif(not available(), reason="this torch has no oneDNN linear")


def _packed(model):
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), PackedLinear)]


def test_packed_layers_give_the_same_logits_and_state_dict():
    model = tiny_target("llama", seed=3)
    ids = torch.randint(3, 97, (1, 9))
    with torch.inference_mode():
        ref = model(ids).logits
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    n = pack_linears(model, min_weights=0)
    assert n == len([m for m in model.modules() if isinstance(m, torch.nn.Linear)]) == len(_packed(model))
    assert pack_linears(model, min_weights=0) == 0  # already packed
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)
    state = model.state_dict()
    assert state.keys() == keys.keys() and all(state[k].equal(keys[k]) for k in keys)
    unpack_linears(model)
    assert _packed(model) == []


def test_speculative_greedy_on_packed_layers_equals_generate():
    model = tiny_target("qwen2", seed=2)
    pack_linears(model, min_weights=0)
    rng = random.Random(0)
    for trial in range(3):
        prompt = [rng.randrange(3, 97) for _ in range(rng.randint(1, 10))]
        ref = hf_greedy(model, prompt, 40)
        for drafter in (OracleDrafter(ref, 97, 32, error_rate=0.3, seed=trial), RandomDrafter(97, 32, seed=trial)):
            out = amphista.SpeculativeDecoder(model, drafter, tree="mc_sim_7b_63").generate(prompt, max_new_tokens=40)
            assert out.sequences[0].tolist() == ref


def test_fallbacks_when_the_weight_changes_or_autograd_needs_it():
    layer = torch.nn.Linear(16, 8)
    pack_linears(layer, min_weights=0)
    x = torch.randn(3, 16, requires_grad=True)
    y = layer(x)  # autograd: sgemm, with a gradient
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    layer.double()  # a cast replaces the data: the reordered copy is stale
    xd = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(xd), F.linear(xd, layer.weight, layer.bias))
    with torch.no_grad():
        layer.weight.data = torch.randn(8, 16)  # new float32 data in the same Parameter
        layer.bias.data = layer.bias.data.float()
        x32 = torch.randn(3, 16)
        torch.testing.assert_close(layer(x32), F.linear(x32, layer.weight, layer.bias))


def test_target_packs_only_large_cpu_layers(monkeypatch):
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=64, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    target = amphista.TargetModel(model)
    # gate/up/down (512 x 1024) are large enough; q/k/v/o (512 x 512 and smaller) and the head are not.
    assert target.packed_linears == 3
    monkeypatch.setenv(ENV, "0")
    assert amphista.TargetModel(tiny_target("llama")).packed_linears == 0
    assert pack_linears(tiny_target("llama"), min_weights=0) == 0
