"""Stopping (EOS, stop strings, max_new_tokens, context window) and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, tiny_target

import amphista
from amphista.drafters import OracleDrafter, RandomDrafter


class LetterTokenizer:
    """Token i decodes to one letter, enough to exercise stop strings without a real vocabulary."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def _decoders(model, ref, tokenizer=None):
    oracle = OracleDrafter(ref, model.config.vocab_size, 32, error_rate=0.2, seed=4)
    return [
        amphista.VanillaDecoder(model, tokenizer),
        amphista.SpeculativeDecoder(model, oracle, "mc_sim_7b_63", tokenizer),
        amphista.SpeculativeDecoder(model, RandomDrafter(model.config.vocab_size, 32), "chain", tokenizer),
    ]


def test_eos_several_ids_stop_exactly_like_generate(llama):
    prompt = [7, 8, 9]
    free = hf_greedy(llama, prompt, 60)
    new = free[len(prompt):]
    eos = [new[17], new[30]]  # two tokens that do occur: the first occurrence of either stops
    first = min(new.index(e) for e in eos)
    ref = llama.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=60, eos_token_id=eos,
                         attention_mask=torch.ones(1, 3, dtype=torch.long))[0].tolist()
    assert len(ref) == len(prompt) + first + 1
    for dec in _decoders(llama, free):
        out = dec.generate(prompt, max_new_tokens=60, eos_token_id=eos)
        assert out.sequences[0].tolist() == ref
        assert out.finish_reason == "stop"
        assert sum(out.accept_lengths) == out.num_new_tokens


def test_stop_strings_cut_at_the_completing_token(llama):
    prompt = [7, 8, 9]
    free = hf_greedy(llama, prompt, 60)
    text = LetterTokenizer().decode(free[len(prompt):])
    stop = text[20:23]
    end = text.index(stop) + len(stop)  # one letter per token: the token that completes the stop string
    for dec in _decoders(llama, free, LetterTokenizer()):
        out = dec.generate(prompt, max_new_tokens=60, stop_strings=[stop, "zzzzzz"], eos_token_id=[])
        assert out.new_tokens == free[len(prompt):][:end]
        assert out.finish_reason == "stop"


def test_max_new_tokens_and_context_window(llama):
    prompt = [7, 8, 9]
    free = hf_greedy(llama, prompt, 60)
    for n in (1, 2, 5, 13):
        for dec in _decoders(llama, free):
            out = dec.generate(prompt, max_new_tokens=n, eos_token_id=[])
            assert out.sequences[0].tolist() == free[: len(prompt) + n]
            assert out.finish_reason == "length"
    small = tiny_target("llama", max_pos=40)
    long_prompt = list(range(3, 33))  # 30 tokens: room for 10 more
    ref = hf_greedy(small, long_prompt, 10)
    for dec in _decoders(small, ref):
        out = dec.generate(long_prompt, max_new_tokens=100, eos_token_id=[])
        assert out.sequences.shape[1] == 40
        assert out.sequences[0].tolist() == ref
        assert out.finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=[]), "prompt is empty"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "prompt is empty"),
        (dict(input_ids=[5] * 256), "context window"),
        (dict(input_ids=[1, 2], max_new_tokens=0), "max_new_tokens"),
        (dict(input_ids=[1, 2], max_new_tokens=-3), "max_new_tokens"),
        (dict(input_ids=torch.ones(2, 3, dtype=torch.long)), "batch size 2"),
        (dict(input_ids=[1, 500]), "outside the target's vocabulary"),
        (dict(input_ids=[1, 2], temperature=-1.0), "temperature"),
        (dict(input_ids=[1, 2], temperature=1.0, top_p=0.0), "top_p"),
        (dict(input_ids=[1, 2], stop_strings=["x"]), "stop strings need a tokenizer"),
        (dict(input_ids=torch.ones(1, 3)), "integer tensor of token ids, got dtype torch.float32"),
        (dict(input_ids=[1, 2], seed=2**70), r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\]"),
        (dict(input_ids=[1, 2], max_length=2), "max_length=2 counts the prompt too"),
        (dict(input_ids=[1, 2], attention_mask=[0, 1]), "padding is not supported"),
        (dict(input_ids=[1, 2], num_beams=2), "unsupported keyword argument 'num_beams'"),
    ],
)
def test_bad_requests_raise_clear_errors(llama, kwargs, match):
    dec = amphista.SpeculativeDecoder(llama, RandomDrafter(97, 32), "chain")
    with pytest.raises(amphista.InputError, match=match):
        dec.generate(**kwargs)


def test_mismatched_drafters_and_trees(llama):
    with pytest.raises(amphista.DrafterMismatchError, match="vocabulary of 500 tokens but the target has 97"):
        amphista.SpeculativeDecoder(llama, RandomDrafter(500, 32), "chain")
    with pytest.raises(amphista.DrafterMismatchError, match="hidden size 4096 but the target has 32"):
        amphista.SpeculativeDecoder(llama, RandomDrafter(97, 4096), "chain")
    with pytest.raises(amphista.TreeError, match="4 levels deep but the drafter has 3 heads"):
        amphista.SpeculativeDecoder(llama, RandomDrafter(97, 32, num_heads=3), "mc_sim_7b_63")
    with pytest.raises(amphista.TreeError, match="unknown tree"):
        amphista.SpeculativeDecoder(llama, RandomDrafter(97, 32), "no_such_tree")
    with pytest.raises(amphista.InputError, match="Drafter"):
        amphista.SpeculativeDecoder(llama, object(), "chain")
