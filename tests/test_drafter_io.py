"""Drafter checkpoints: Hugging Face layout, round trip, and a clear error for each way loading can fail."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_target
from safetensors.torch import load_file

import amphista
from amphista import (
    AmphistaDrafter,
    CheckpointError,
    DrafterMismatchError,
    InputError,
    MedusaDrafter,
    TargetModel,
    load_drafter,
)


@pytest.fixture(scope="module")
def target():
    return TargetModel(tiny_target("llama", seed=3))


def perturbed(drafter):
    with torch.no_grad():
        for p in drafter.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return drafter


def inputs(target, T=9):
    tokens = torch.randint(3, target.vocab_size, (2, T + 1), generator=torch.Generator().manual_seed(0))
    hidden, _ = target.forward_train(tokens[:, :-1])
    return hidden.clone(), tokens[:, 1:]


DRAFTERS = {
    "medusa": lambda t: MedusaDrafter.for_target(t, num_heads=3),
    "medusa_shared": lambda t: MedusaDrafter.for_target(t, shared_lm_head=True),
    "amphista": lambda t: AmphistaDrafter.for_target(t),
    "amphista_shared": lambda t: AmphistaDrafter.for_target(t, shared_lm_head=True, aeb_layers=2),
    "amphista_narrow": lambda t: AmphistaDrafter.for_target(
        t, sal_width=16, aeb_width=8, sal_variant="split", position_embedding="sinusoidal"
    ),
}


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_round_trip(target, tmp_path, name):
    drafter = perturbed(DRAFTERS[name](target))
    drafter.save_pretrained(tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = load_drafter(tmp_path / "d", target=target)
    assert type(loaded) is type(drafter) and loaded.config == drafter.config
    assert len(loaded.trainable_parameters()) == len(drafter.trainable_parameters())  # ready to fine-tune
    hidden, nxt = inputs(target)
    with torch.no_grad():
        torch.testing.assert_close(loaded(hidden, nxt), drafter(hidden, nxt), atol=0, rtol=0)
    loaded.reset(16)
    drafter.reset(16)
    torch.testing.assert_close(loaded.draft(hidden[:1], nxt[:1], 0), drafter.draft(hidden[:1], nxt[:1], 0))


def test_dtype_is_kept_unless_asked(target, tmp_path):
    AmphistaDrafter.for_target(target, dtype=torch.bfloat16).save_pretrained(tmp_path / "d")
    assert load_drafter(tmp_path / "d", target=target).dtype == torch.bfloat16
    assert load_drafter(tmp_path / "d", dtype=torch.float32).dtype == torch.float32


def test_config_json_records_type_version_and_target(target, tmp_path):
    AmphistaDrafter.for_target(target, num_heads=3).save_pretrained(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "config.json").read_text())
    assert meta["drafter_type"] == "amphista" and meta["format_version"] == 1
    assert meta["config"]["num_heads"] == 3 and meta["config"]["sal_stages"] == 2
    assert meta["built_for"] == {
        "architecture": "LlamaForCausalLM",
        "hidden_size": target.hidden_size,
        "vocab_size": target.vocab_size,
        "name_or_path": target.name_or_path,
    }
    assert "LlamaForCausalLM" in (tmp_path / "d" / "README.md").read_text()


def test_borrowed_tables_are_not_saved(target, tmp_path):
    drafter = AmphistaDrafter.for_target(target, shared_lm_head=True)
    drafter.save_pretrained(tmp_path / "d")
    saved = load_file(str(tmp_path / "d" / "model.safetensors"))
    V, d = target.vocab_size, target.hidden_size
    assert not any(t.shape in ((V, d), (1, V, d)) for t in saved.values())
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in drafter.parameters())
    # Loaded without a target, the drafter cannot run until one is attached.
    loaded = load_drafter(tmp_path / "d")
    hidden, nxt = inputs(target)
    with pytest.raises(InputError, match="attach"):
        loaded(hidden, nxt)
    loaded.attach(target)
    loaded(hidden, nxt)


def test_save_is_atomic_and_overwrites(target, tmp_path):
    first = perturbed(MedusaDrafter.for_target(target))
    first.save_pretrained(tmp_path / "d")
    second = perturbed(MedusaDrafter.for_target(target))
    second.save_pretrained(tmp_path / "d")
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary or old folders left behind
    torch.testing.assert_close(load_drafter(tmp_path / "d").resblocks.weight, second.resblocks.weight)


def test_load_for_another_target_fails_clearly(target, tmp_path):
    AmphistaDrafter.for_target(target).save_pretrained(tmp_path / "d")
    other_vocab = tiny_target("llama", vocab=101)
    with pytest.raises(DrafterMismatchError, match="vocabulary of 97 tokens but the target has 101"):
        load_drafter(tmp_path / "d", target=other_vocab)
    wider = tiny_llama_of_width(48)  # same vocabulary, another width
    with pytest.raises(DrafterMismatchError, match="hidden size 32 but the target has 48"):
        load_drafter(tmp_path / "d", target=wider)
    with pytest.raises(DrafterMismatchError, match="LlamaForCausalLM target but this target is a Qwen2ForCausalLM"):
        load_drafter(tmp_path / "d", target=tiny_target("qwen2"))
    with pytest.raises(DrafterMismatchError):
        amphista.SpeculativeDecoder(tiny_target("qwen2"), load_drafter(tmp_path / "d"))


def tiny_llama_of_width(hidden_size):
    import transformers as T

    cfg = T.LlamaConfig(
        vocab_size=97, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    return T.LlamaForCausalLM(cfg)


def _corrupt(path, name, text=None, data=None):
    if text is not None:
        (path / name).write_text(text)
    elif data is not None:
        (path / name).write_bytes(data)
    else:
        (path / name).unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _corrupt(p, "config.json"), "no config.json"),
        (lambda p: _corrupt(p, "model.safetensors"), "no model.safetensors"),
        (lambda p: _corrupt(p, "config.json", text="{not json"), "not valid JSON"),
        (lambda p: _corrupt(p, "model.safetensors", data=b"\x00garbage"), "cannot be read"),
        (lambda p: _set(p, format_version=99), "format 99 .* upgrade amphista"),
        (lambda p: _set(p, drafter_type="eagle"), "drafter type 'eagle'"),
        (lambda p: _set(p, config={"hidden_size": 32, "vocab_size": 97, "bogus": 1}), "unknown"),
        (lambda p: _set(p, config={"hidden_size": 32, "vocab_size": 97, "num_heads": 2}), "does not match"),
    ],
    ids=["no-config", "no-weights", "bad-json", "bad-weights", "newer-format", "unknown-type", "bad-field", "shape"],
)
def test_broken_checkpoints_fail_clearly(target, tmp_path, damage, message):
    MedusaDrafter.for_target(target).save_pretrained(tmp_path / "d")
    damage(tmp_path / "d")
    with pytest.raises(CheckpointError, match=message):
        load_drafter(tmp_path / "d", target=target)


def _set(path, **fields):
    meta = json.loads((path / "config.json").read_text())
    meta.update(fields)
    (path / "config.json").write_text(json.dumps(meta))


def test_missing_folder_fails_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_drafter(tmp_path / "nowhere")
