"""generate/stream as Hugging Face users call them: tokenizer output, do_sample, max_length, GenerationConfig,
clear errors for what is not supported, and help() that documents every keyword."""

from __future__ import annotations

import inspect
import pydoc

import pytest
import torch
from conftest import hf_greedy
from transformers import GenerationConfig

import amphista
from amphista.drafters import OracleDrafter, RandomDrafter
from amphista.generation import GENERATE_KEYWORDS

PROMPT = [7, 8, 9]


@pytest.fixture(scope="module")
def bundled():
    target = amphista.load_default_target()
    return target, amphista.load_default_drafter(target=target)


@pytest.fixture(scope="module")
def free(llama):
    return hf_greedy(llama, PROMPT, 40)


@pytest.fixture(scope="module")
def spec(llama, free):
    # An oracle that is sometimes wrong: steps accept several tokens, and some reject, both paths run.
    return amphista.SpeculativeDecoder(
        llama, OracleDrafter(free, 97, 32, error_rate=0.2, seed=1), "mc_sim_7b_63"
    )


def test_tokenizer_output_unpacks_into_generate_and_stream(bundled):
    target, drafter = bundled
    enc = target.tokenizer("Once upon a time", return_tensors="pt")
    assert set(enc) == {"input_ids", "attention_mask"}
    hf = target.model.generate(**enc, do_sample=False, max_new_tokens=8)[0].tolist()
    spec = amphista.SpeculativeDecoder(target, drafter)
    vanilla = amphista.VanillaDecoder(target)
    for dec in (spec, vanilla):
        out = dec.generate(**enc, max_new_tokens=8)
        assert out.sequences[0].tolist() == hf
        assert (
            out.sequences[0].tolist()
            == dec.generate(enc["input_ids"], max_new_tokens=8).sequences[0].tolist()
        )
        streamed = [t for ids in dec.stream(**enc, max_new_tokens=8) for t in ids]
        assert streamed == hf[enc["input_ids"].shape[1] :]
    assert amphista.vanilla_generate(target, **enc, max_new_tokens=8).sequences[0].tolist() == hf


@pytest.mark.parametrize(
    "mask", [[[1, 1, 1]], [1, 1, 1], torch.ones(1, 3, dtype=torch.long), torch.ones(3, dtype=torch.bool)]
)
def test_an_all_ones_attention_mask_is_accepted(spec, free, mask):
    out = spec.generate(PROMPT, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    assert out.sequences[0].tolist() == free[:13]


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.tensor([[0, 1, 1]]), "masks out 1 of the prompt's 3 positions.*padding is not supported"),
        ([1, 1, 0], "padding is not supported"),
        (torch.ones(1, 4, dtype=torch.long), r"shape \(4,\) but the prompt has 3 tokens"),
        ("ones", "attention_mask must be a tensor or a list"),
    ],
)
def test_a_padded_or_mismatched_attention_mask_is_refused(spec, mask, match):
    with pytest.raises(amphista.InputError, match=match):
        spec.generate(PROMPT, attention_mask=mask, max_new_tokens=4)


def _sampled(llama, free, **kwargs) -> list[int]:
    # A fresh stub drafter per call: its noise generator runs on across sequences, and with other drafts the
    # same seed draws other (equally distributed) tokens.
    dec = amphista.SpeculativeDecoder(
        llama, OracleDrafter(free, 97, 32, error_rate=0.2, seed=1), "mc_sim_7b_63"
    )
    return dec.generate(PROMPT, max_new_tokens=20, eos_token_id=[], **kwargs).new_tokens


def test_do_sample(spec, free, llama):
    greedy = spec.generate(PROMPT, max_new_tokens=20, eos_token_id=[]).new_tokens
    assert greedy == free[3:23]
    # As in transformers, do_sample=False decodes greedily whatever the temperature.
    assert (
        spec.generate(PROMPT, max_new_tokens=20, eos_token_id=[], do_sample=False, temperature=0.9).new_tokens
        == greedy
    )
    sampled = _sampled(llama, free, do_sample=True, seed=11)
    assert sampled == _sampled(llama, free, do_sample=True, seed=11)
    assert sampled == _sampled(llama, free, temperature=1.0, seed=11)
    assert sampled != greedy  # it really sampled
    assert _sampled(llama, free, do_sample=True, temperature=0.5, seed=11) == _sampled(
        llama, free, temperature=0.5, seed=11
    )
    with pytest.raises(amphista.InputError, match="do_sample=True needs a temperature > 0"):
        spec.generate(PROMPT, do_sample=True, temperature=0.0)
    with pytest.raises(amphista.InputError, match="do_sample must be True or False"):
        spec.generate(PROMPT, do_sample="yes")


def test_max_length_counts_the_prompt(spec, free):
    out = spec.generate(PROMPT, max_length=10, eos_token_id=[])
    assert out.sequences[0].tolist() == free[:10]
    assert out.finish_reason == "length"
    # transformers: max_new_tokens takes precedence over max_length.
    assert spec.generate(PROMPT, max_length=10, max_new_tokens=4, eos_token_id=[]).num_new_tokens == 4
    with pytest.raises(amphista.InputError, match="max_length=3 counts the prompt too.*already has 3 tokens"):
        spec.generate(PROMPT, max_length=3)
    with pytest.raises(amphista.InputError, match="max_length must be a positive integer"):
        spec.generate(PROMPT, max_length=0)


def test_generation_config_is_read_and_keywords_override_it(spec, free, llama):
    cfg = GenerationConfig(
        max_new_tokens=20, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, eos_token_id=[]
    )
    from_config = _sampled(llama, free, generation_config=cfg, seed=5)
    assert from_config == _sampled(llama, free, temperature=0.7, top_k=20, top_p=0.9, seed=5)
    assert from_config != free[3:23]
    # Explicit keywords win, as in transformers.
    greedy = spec.generate(PROMPT, generation_config=cfg, do_sample=False, max_new_tokens=12)
    assert greedy.new_tokens == free[3:15]
    assert (
        spec.generate(
            PROMPT, generation_config=GenerationConfig(max_length=9), eos_token_id=[]
        ).num_new_tokens
        == 6
    )
    # The model's own config, as from_pretrained leaves it: token ids and neutral settings are fine.
    own = GenerationConfig(
        bos_token_id=1, pad_token_id=0, eos_token_id=2, num_beams=1, repetition_penalty=1.0
    )
    out = spec.generate(PROMPT, generation_config=own, max_new_tokens=30)
    ref = llama.generate(
        torch.tensor([PROMPT]),
        attention_mask=torch.ones(1, 3, dtype=torch.long),
        generation_config=own,
        do_sample=False,
        max_new_tokens=30,
    )
    assert out.sequences[0].tolist() == ref[0].tolist()


@pytest.mark.parametrize(
    "cfg, match",
    [
        (GenerationConfig(num_beams=4), "num_beams=4"),
        (
            GenerationConfig(repetition_penalty=1.2, min_new_tokens=5),
            "min_new_tokens=5, repetition_penalty=1.2",
        ),
        ({"max_new_tokens": 4}, "must be a transformers.GenerationConfig, got dict"),
    ],
)
def test_generation_config_settings_that_would_change_the_output_are_refused(spec, cfg, match):
    with pytest.raises(amphista.InputError, match=match):
        spec.generate(PROMPT, generation_config=cfg)


def test_unknown_keywords_name_themselves_and_the_supported_ones(spec, llama):
    supported = "Supported: input_ids, " + ", ".join(GENERATE_KEYWORDS)
    with pytest.raises(amphista.InputError, match="'num_beams'") as e:
        spec.generate(PROMPT, num_beams=2)
    assert "no beam search" in str(e.value) and supported in str(e.value)
    with pytest.raises(
        amphista.InputError,
        match=r"stream\(\) got unsupported keyword arguments 'frobnicate', 'repetition_penalty'",
    ):
        next(spec.stream(PROMPT, repetition_penalty=1.1, frobnicate=True))
    with pytest.raises(amphista.InputError, match="'streamer'.*decoder.stream"):
        amphista.VanillaDecoder(llama).generate(PROMPT, streamer=object())
    with pytest.raises(amphista.InputError, match="'output_scores'"):
        amphista.vanilla_generate(llama, PROMPT, output_scores=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(input_ids=torch.tensor([[7.0, 8.0, 9.0]])),
            "integer tensor of token ids, got dtype torch.float32",
        ),
        (dict(input_ids=torch.tensor([[True, False]])), "integer tensor of token ids, got dtype torch.bool"),
        (dict(input_ids=[7, 8.0, 9]), r"integer token ids, got 8.0 \(float\)"),
        (
            dict(input_ids=PROMPT, seed=2**70, temperature=1.0),
            r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\]",
        ),
        (dict(input_ids=PROMPT, seed=2**70), r"2\*\*64 - 1"),  # refused even when greedy decoding ignores it
        (dict(input_ids=PROMPT, seed=-(2**63) - 1), r"2\*\*64 - 1"),
        (dict(input_ids=PROMPT, seed="7"), "seed must be an integer"),
        (dict(input_ids=PROMPT, top_k=2.5), "top_k must be an integer"),
        (dict(input_ids=PROMPT, temperature="hot"), "temperature must be a number"),
        (dict(input_ids=PROMPT, max_new_tokens=True), "max_new_tokens must be a positive integer"),
        (dict(input_ids=PROMPT, eos_token_id="2"), "eos_token_id must be a token id or a list"),
        (dict(input_ids=PROMPT, stop_strings=[1]), "stop_strings must be a string or a list of strings"),
    ],
)
def test_bad_values_name_the_problem(spec, kwargs, match):
    with pytest.raises(amphista.InputError, match=match):
        spec.generate(**kwargs)


def test_the_largest_and_smallest_seeds_work(spec):
    for seed in (2**64 - 1, -(2**63), 0):
        assert spec.generate(PROMPT, max_new_tokens=3, temperature=1.0, seed=seed).num_new_tokens >= 1


@pytest.mark.parametrize(
    "function",
    [
        amphista.SpeculativeDecoder.generate,
        amphista.SpeculativeDecoder.stream,
        amphista.VanillaDecoder.generate,
        amphista.VanillaDecoder.stream,
        amphista.vanilla_generate,
    ],
)
def test_help_lists_every_keyword_with_its_default(function):
    params = inspect.signature(function).parameters
    keyword_only = [
        n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "tokenizer"
    ]
    assert keyword_only == [n for n in GENERATE_KEYWORDS if n != "tokenizer"]
    text = pydoc.render_doc(function, renderer=pydoc.plaintext)
    for name in ("input_ids", *GENERATE_KEYWORDS):
        assert f"    {name}: " in text, name  # described in Args, not only in the signature
    assert "Default 128" in text and "InputError" in text


@pytest.mark.parametrize("cls", [amphista.AmphistaConfig, amphista.MedusaConfig])
def test_config_docstrings_describe_every_field(cls):
    import dataclasses

    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    for f in dataclasses.fields(cls):
        assert f"    {f.name}: " in text, f.name


@pytest.mark.parametrize(
    "obj",
    [
        amphista.SpeculativeDecoder,
        amphista.VanillaDecoder,
        amphista.GenerateOutput,
        amphista.AmphistaDrafter,
        amphista.MedusaDrafter,
        amphista.Drafter,
    ],
)
def test_public_classes_have_real_docstrings(obj):
    doc = inspect.getdoc(obj) or ""
    assert len(doc.splitlines()) >= 5, obj.__name__


def test_random_drafter_decoder_accepts_the_same_keywords(llama, free):
    # A drafter that is always wrong: every step commits only the bonus token, and output still matches.
    dec = amphista.SpeculativeDecoder(llama, RandomDrafter(97, 32), "chain")
    out = dec.generate(
        torch.tensor([PROMPT]),
        attention_mask=torch.ones(1, 3, dtype=torch.long),
        max_length=15,
        pad_token_id=0,
        eos_token_id=[],
    )
    assert out.sequences[0].tolist() == free[:15]
