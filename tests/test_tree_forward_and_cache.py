"""Tree-forward logits equal per-path sequential logits; the compacted cache equals recomputation."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, hf_greedy, tiny_target
from transformers import DynamicCache

import amphista
from amphista.decoder import TreeMask
from amphista.drafters import OracleDrafter
from amphista.kv_cache import TreeCache
from amphista.target import TargetModel, cache_keyword
from amphista.tree import TreeBuffers, TreeSpec


def _tree_vs_paths(model, dtype, atol):
    target = TargetModel(model)
    spec = TreeSpec.load("mc_sim_7b_63")
    buf = TreeBuffers(spec)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 97, (1, 11), generator=g)
    tokens = torch.randint(3, 97, (spec.num_nodes,), generator=g)  # (N,) node 0 is the root

    cache = TreeCache(target.num_layers, 11 + spec.num_nodes)
    target.forward(prefix, position_ids=torch.arange(11)[None], cache=cache)
    mask = TreeMask(buf, cache.max_len, target.dtype, "cpu", None, None)
    tree_logits = target.forward(tokens[None], position_ids=(11 + buf.depth)[None], attention_mask=mask(11),
                                 cache=cache).logits[0]  # (N, V)

    # Each node's path from the root, run as an ordinary causal sequence after the prefix.
    ancestors = [torch.nonzero(buf.mask[i]).flatten() for i in range(spec.num_nodes)]
    for i in range(spec.num_nodes):
        seq = torch.cat([prefix[0], tokens[ancestors[i]]])[None]
        ref = target.forward(seq).logits[0, -1]
        torch.testing.assert_close(tree_logits[i], ref, atol=atol, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_tree_logits_equal_per_path_logits_fp32(arch):
    _tree_vs_paths(tiny_target(arch, seed=2), torch.float32, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tree_logits_equal_per_path_logits_half(dtype):
    _tree_vs_paths(tiny_target("llama", seed=2, dtype=dtype), dtype, atol=0.1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_compacted_cache_equals_fresh_forward(arch):
    model = tiny_target(arch, seed=3)
    prompt = [5, 9, 11, 20]
    ref = hf_greedy(model, prompt, 40)
    dec = amphista.SpeculativeDecoder(model, OracleDrafter(ref, 97, 32, error_rate=0.35, seed=1), "mc_sim_7b_63")
    captured = {}
    original = TreeCache.commit

    def spy(self, *args):
        original(self, *args)
        captured["cache"] = self

    TreeCache.commit = spy
    try:
        out = dec.generate(prompt, max_new_tokens=40, eos_token_id=[])
    finally:
        TreeCache.commit = original
    cache = captured["cache"]
    seq = out.sequences[0].tolist()
    assert any(a > 1 for a in out.accept_lengths[1:]) and any(a < 5 for a in out.accept_lengths[1:])
    # The cache holds every committed token but the newest (the next root, not yet run).
    assert cache.length == len(seq) - 1
    fresh = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([seq[:-1]]), use_cache=True, **{cache_keyword(model): fresh})
    for layer, ref_layer in zip(cache.layers, fresh.layers):
        # Sliding-window layers of the reference keep only their window; ours keep everything.
        n = ref_layer.keys.shape[2]
        assert n == layer.keys.shape[2] or getattr(ref_layer, "is_sliding", False)
        torch.testing.assert_close(layer.keys[:, :, -n:], ref_layer.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.values[:, :, -n:], ref_layer.values, atol=1e-5, rtol=0)


def test_cache_is_sized_by_the_request_not_the_context(llama):
    dec = amphista.SpeculativeDecoder(llama, OracleDrafter([], 97, 32), "mc_sim_7b_63")
    req = dec._request([1, 2, 3], {"max_new_tokens": 10})
    cache = dec._new_cache(req)
    assert cache.max_len == 3 + 10 + 64
    assert llama.config.max_position_embeddings == 256


@pytest.mark.parametrize("heads", [(2, 2, 2), (2, 4, 2)])
def test_commit_moves_the_accepted_rows_in_every_layer(heads):
    """Equal layers share one buffer and are compacted in one gather; a layer of another shape keeps its
    own buffer and is compacted on its own. Either way each layer ends up holding exactly the kept rows."""
    g = torch.Generator().manual_seed(0)
    cache = TreeCache(len(heads), 20)
    written = []
    for i, h in enumerate(heads):
        k, v = torch.randn(1, h, 14, 4, generator=g), torch.randn(1, h, 14, 4, generator=g)
        cache.layers[i].update(k, v)
        written.append((k, v))
    same = [h == heads[0] for h in heads]
    assert [layer.joint for layer in cache.layers] == same
    assert cache.storage.slots == sum(same)
    nodes = [0, 2, 5, 9]  # accepted tree nodes, relative to start 3
    cache.commit(3, torch.tensor(nodes), nodes)
    src = [0, 1, 2] + [3 + n for n in nodes]
    for layer, (k, v) in zip(cache.layers, written):
        assert layer.length == 7
        torch.testing.assert_close(layer.keys, k[:, :, src], atol=0, rtol=0)
        torch.testing.assert_close(layer.values, v[:, :, src], atol=0, rtol=0)
    # A top-1 chain is already in place: nothing moves, only the length changes.
    before = cache.layers[0].keys.clone()
    cache.commit(5, torch.tensor([0, 1]), [0, 1])
    assert cache.length == 7
    torch.testing.assert_close(cache.layers[0].keys, before[:, :, :7], atol=0, rtol=0)


def test_tree_attention_broadcasts_kv_groups_like_transformers_copies_them():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from amphista.target import tree_sdpa

    class Layer(torch.nn.Module):
        num_key_value_groups, is_causal = 3, True

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 5, 8, generator=g)
    k, v = torch.randn(2, 1, 2, 19, 8, generator=g)
    mask = torch.zeros(1, 1, 5, 19).masked_fill_(torch.rand(5, 19, generator=g) < 0.3, torch.finfo(torch.float32).min)
    ours, _ = tree_sdpa(Layer(), q, k, v, mask, scaling=0.3)
    ref, _ = sdpa_attention_forward(Layer(), q, k, v, mask, scaling=0.3)
    assert ours.shape == ref.shape == (1, 5, 6, 8)
    torch.testing.assert_close(ours, ref)


def test_target_uses_tree_attention_unless_eager_was_chosen():
    assert TargetModel(tiny_target("llama")).config._attn_implementation == "amphista_sdpa"
    eager = tiny_target("llama")
    eager.set_attn_implementation("eager")
    assert TargetModel(eager).config._attn_implementation == "eager"
