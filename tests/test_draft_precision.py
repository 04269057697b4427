"""The dtype commands draft in: bfloat16 only where measured faster, cached, never changing the output."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_target

import amphista
from amphista import bundled
from amphista.bench.loading import load_drafter_dir
from amphista.drafters import precision
from amphista.errors import InputError
from amphista.sources import cache_dir


def _timed(monkeypatch, seconds):
    """Replace the timing with `seconds[dtype name]`, recording each call."""
    calls = []

    def fake(drafter):
        name = str(drafter.dtype).removeprefix("torch.")
        calls.append(name)
        return seconds[name]

    monkeypatch.setattr(precision, "_draft_seconds", fake)
    return calls


def test_bfloat16_is_chosen_only_when_clearly_faster_and_the_choice_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("AMPHISTA_CACHE", str(tmp_path))  # nothing measured by other tests
    target = amphista.load_default_target()
    drafter = load_drafter_dir("amphista", bundled.default_drafter_path("amphista"), target, "float32")
    seconds = {"float32": 1.0, "bfloat16": 0.9}  # 10% faster: not enough
    calls = _timed(monkeypatch, seconds)
    assert precision.drafting_dtype(drafter, target) == torch.float32 and calls == ["float32", "bfloat16"]
    seconds["bfloat16"] = 0.5
    assert precision.drafting_dtype(drafter, target) == torch.float32 and len(calls) == 2  # read from the cache
    for path in (cache_dir() / "draft_dtype").iterdir():
        path.write_text("{not json")
    assert precision.drafting_dtype(drafter, target) == torch.bfloat16 and len(calls) == 4  # corrupt: measured again
    assert drafter.dtype == torch.float32  # measuring leaves the drafter as found
    chosen = precision.for_drafting(drafter, target)
    assert chosen.dtype == torch.bfloat16 and len(calls) == 4


def test_targets_off_the_cpu_or_not_float32_keep_their_dtype_unmeasured(monkeypatch):
    calls = _timed(monkeypatch, {"float32": 1.0, "bfloat16": 0.1})
    target = amphista.TargetModel.wrap(tiny_target(dtype=torch.bfloat16))
    drafter = amphista.MedusaDrafter.for_target(target, num_heads=2)
    assert precision.drafting_dtype(drafter, target) == torch.bfloat16 and calls == []
    assert precision.for_drafting(drafter, target, "float32").dtype == torch.float32 and calls == []


def test_dtype_names_are_checked():
    assert precision.parse_dtype("bf16") == torch.bfloat16 and precision.parse_dtype("auto") == "auto"
    with pytest.raises(InputError, match="auto, float32, bfloat16"):
        precision.parse_dtype("int8")


@pytest.mark.parametrize("kind", ["medusa", "amphista"])
def test_a_bfloat16_drafter_with_a_draft_vocabulary_stays_exact(kind):
    # A float32 target, a bfloat16 drafter reading the target's lm_head rows for its draft vocabulary: the
    # rows follow the drafter's dtype, and greedy output is still the target's own.
    target = amphista.TargetModel.wrap(tiny_target(vocab=97))
    cls = amphista.MedusaDrafter if kind == "medusa" else amphista.AmphistaDrafter
    torch.manual_seed(0)
    drafter = cls.for_target(target, num_heads=3, dtype=torch.float32, d2t=torch.arange(0, 97, 2),
                             shared_lm_head=True)
    for p in drafter.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    drafter = precision.for_drafting(drafter, target, "bfloat16")
    assert drafter._lm_head().weight.dtype == torch.bfloat16
    prompt = [5, 17, 3, 40, 22]
    plain = amphista.VanillaDecoder(target).generate(prompt, max_new_tokens=40, eos_token_id=[])
    out = amphista.SpeculativeDecoder(target, drafter, tree="chain").generate(prompt, max_new_tokens=40,
                                                                               eos_token_id=[])
    assert out.sequences.tolist() == plain.sequences.tolist()
    assert precision.for_drafting(drafter, target, "float32")._lm_head().weight.dtype == torch.float32


def test_a_real_measurement_returns_float32_or_bfloat16(monkeypatch, tmp_path):
    monkeypatch.setenv("AMPHISTA_CACHE", str(tmp_path))
    target = amphista.load_default_target()
    drafter = load_drafter_dir("medusa", bundled.default_drafter_path("medusa"), target, "float32")
    assert precision.drafting_dtype(drafter, target) in (torch.float32, torch.bfloat16)
