"""oneDNN-packed linear layers on the CPU: same results, exact speculation, safe fallbacks."""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_greedy, tiny_target

import amphista
from amphista import cpu
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

    cfg = T.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=1024, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    target = amphista.TargetModel(model)
    # q/o (256 x 256 = MIN_WEIGHTS) and gate/up/down (256 x 1024) are large enough; k/v (64 x 256) and the
    # head (64 x 256) are not.
    assert cpu.MIN_WEIGHTS == 256 * 256
    assert target.packed_linears == 5
    monkeypatch.setenv(ENV, "0")
    assert amphista.TargetModel(tiny_target("llama")).packed_linears == 0
    assert pack_linears(tiny_target("llama"), min_weights=0) == 0


# --- drafting through packed weights (cpu.packed / cpu.linear) ---------------------------------------------

D2T = torch.tensor(sorted({2, *range(3, 97, 4)}))[:24]
DRAFTERS = {
    "amphista": {},
    "amphista_split": {"sal_variant": "split"},
    "amphista_shared_d2t": {"shared_lm_head": True, "d2t": D2T},
    "medusa_shared_d2t": {"kind": "medusa", "shared_lm_head": True, "d2t": D2T},
}
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bfloat16 on this CPU"))]


@pytest.fixture
def pack_all(monkeypatch):
    """Every drafter weight large enough to pack: the tiny test drafters take the path a real one takes."""
    monkeypatch.setattr(cpu, "MIN_WEIGHTS", 0)


def _drafter(target, kind="amphista", seed=0, **overrides):
    torch.manual_seed(seed)
    cls = amphista.MedusaDrafter if kind == "medusa" else amphista.AmphistaDrafter
    drafter = cls.for_target(target, num_heads=4, dtype=torch.float32, **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return drafter


@torch.inference_mode()
def _drafts(drafter, hidden, tokens, splits=(5, 1, 2, 1, 3)):
    drafter.reset(32)
    out, pos = [], 0
    for n in splits:
        out.append(drafter.draft_topk_probs(hidden[:, pos : pos + n], tokens[:, pos : pos + n], pos, 4, 3)[1])
        out.append(drafter._draft_logits(hidden[:, pos : pos + n], tokens[:, pos : pos + n], pos))
        pos += n
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", DRAFTERS)
def test_packed_drafts_equal_unpacked_ones(pack_all, monkeypatch, name, dtype):
    target = amphista.TargetModel(tiny_target("llama", seed=3))
    drafter = _drafter(target, **DRAFTERS[name]).to(dtype)
    g = torch.Generator().manual_seed(1)
    hidden, tokens = torch.randn(1, 12, target.hidden_size, generator=g), torch.randint(3, 97, (1, 12), generator=g)
    before = len(cpu._PACKED)
    packed = _drafts(drafter, hidden, tokens)
    assert len(cpu._PACKED) > before  # the drafter's projections went through oneDNN
    monkeypatch.setenv(ENV, "0")
    plain = _drafts(drafter, hidden, tokens)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for a, b in zip(packed, plain, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_packed_copies_follow_the_weights(pack_all):
    target = amphista.TargetModel(tiny_target("llama", seed=3))
    drafter = _drafter(target)
    g = torch.Generator().manual_seed(2)
    hidden, tokens = torch.randn(1, 12, target.hidden_size, generator=g), torch.randint(3, 97, (1, 12), generator=g)
    _drafts(drafter, hidden, tokens)
    with torch.no_grad():  # an optimizer step: the same tensors, new values
        for p in drafter.trainable_parameters():
            p.mul_(1.5)
        full = drafter(hidden, tokens)[0, -1]  # (K, V), the training forward
    drafter.reset(32)
    torch.testing.assert_close(drafter.draft(hidden, tokens, 0), full, atol=2e-5, rtol=1e-5)


def test_packed_weight_is_reused_until_the_weight_changes(monkeypatch):
    w = torch.nn.Parameter(torch.randn(64, 32))
    assert cpu.packed(w) is None  # below MIN_WEIGHTS: sgemm stays
    first = cpu.packed(w, min_weights=0)
    assert cpu.packed(w, min_weights=0) is first
    x = torch.randn(3, 32)
    torch.testing.assert_close(first.mm(x), x @ w.detach().t(), atol=1e-5, rtol=1e-5)
    base = torch.randn(3, 64)
    torch.testing.assert_close(first.add(base, x), base + x @ w.detach().t(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        w.add_(1.0)
    second = cpu.packed(w, min_weights=0)
    assert second is not first
    torch.testing.assert_close(second.mm(x), x @ w.detach().t(), atol=1e-5, rtol=1e-5)
    assert cpu.packed(w.detach().double(), min_weights=0) is None  # float64: not oneDNN's
    y = cpu.linear(x.requires_grad_(), w)  # autograd: F.linear, with a gradient
    y.sum().backward()
    assert w.grad is not None
    monkeypatch.setenv(ENV, "0")
    assert cpu.packed(w, min_weights=0) is None
    key = id(w)
    del w, y, first, second
    gc.collect()
    assert key not in cpu._PACKED  # dropped with the weight


@pytest.mark.parametrize("name", ["amphista", "medusa_shared_d2t"])
def test_speculative_greedy_with_packed_drafters_equals_generate(pack_all, name):
    model = tiny_target("llama", seed=4)
    drafter = _drafter(amphista.TargetModel(model), **DRAFTERS[name])
    rng = random.Random(name)
    for _ in range(2):
        prompt = [rng.randrange(3, 97) for _ in range(rng.randint(1, 10))]
        ref = hf_greedy(model, prompt, 30)
        decoder = amphista.SpeculativeDecoder(model, drafter, tree="mc_sim_7b_63")
        assert decoder.generate(prompt, max_new_tokens=30).sequences[0].tolist() == ref
        outs = decoder.generate_batch([prompt, prompt[:1] + [5, 6]], max_new_tokens=30, eos_token_id=[])
        assert outs[0].sequences[0].tolist() == ref


def test_a_drafter_with_packed_weights_deep_copies_and_pickles(pack_all):
    import copy
    import io

    target = amphista.TargetModel(tiny_target("llama", seed=3))
    drafter = _drafter(target)
    g = torch.Generator().manual_seed(3)
    hidden, tokens = torch.randn(1, 12, target.hidden_size, generator=g), torch.randint(3, 97, (1, 12), generator=g)
    ref = _drafts(drafter, hidden, tokens)  # the drafting weights now hold packed copies
    twin = copy.deepcopy(drafter)  # what the drafting-dtype measurement does
    buffer = io.BytesIO()
    torch.save(drafter, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded.attach(target)
    for other in (twin, loaded):
        for a, b in zip(_drafts(other, hidden, tokens), ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        twin.resblocks.weight.mul_(2.0)  # the copy's weights are its own
    _drafts(twin, hidden, tokens)
    for a, b in zip(_drafts(drafter, hidden, tokens), ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_a_cast_retires_the_packed_copy_even_where_the_allocator_reuses_the_address():
    layer = torch.nn.Linear(16, 8)
    pack_linears(layer, min_weights=0)
    layer.double()
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert "forward" not in layer.__dict__  # the layer is its own again: nothing stale can come back
    w = torch.nn.Parameter(torch.randn(32, 16))
    first, address = cpu.packed(w, min_weights=0), w.data_ptr()
    # The copy holds the data it was made from: no later tensor can be handed that address while it lives.
    assert cpu._PACKED[id(w)][2].data_ptr() == address
    with torch.no_grad():  # a cast away and back: new data of the same dtype and shape, the version unchanged
        w.data = w.data.double()
        w.data = torch.randn(32, 16)
    assert cpu.packed(w, min_weights=0) is not first
    x32 = torch.randn(3, 16)
    torch.testing.assert_close(cpu.packed(w, min_weights=0).mm(x32), x32 @ w.detach().t(), atol=1e-5, rtol=1e-5)


def _huge_pages_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


@pytest.mark.skipif(_huge_pages_mode() not in ("madvise", "always"), reason="the kernel has no huge pages")
def test_the_command_line_maps_large_tensors_with_huge_pages():
    """`amphista` sets THP_MEM_ALLOC_ENABLE before torch's first allocation; the environment can say no."""
    script = textwrap.dedent("""
        import contextlib, io
        from amphista.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            main([])
        import torch
        x = torch.ones(32 << 20)  # 128 MB, touched
        with open("/proc/self/smaps_rollup") as f:
            print(next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages")))
    """)

    def huge_kb(**env) -> int:
        environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
        command = [sys.executable, "-c", script]
        out = subprocess.run(command, env=environ, capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    assert huge_kb() >= 64 << 10  # most of the tensor's 128 MB in 2 MB pages
    if _huge_pages_mode() == "madvise":  # only asked-for mappings get them
        assert huge_kb(THP_MEM_ALLOC_ENABLE="0") < 64 << 10
