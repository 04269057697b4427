"""What vanilla and speculative decoding share: request checks, outputs, generate/stream, prefill."""

from __future__ import annotations

import operator
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .errors import InputError
from .kv_cache import TreeCache
from .sampling import PositionSampler, SamplingParams
from .stopping import StopChecker
from .target import TargetModel

DEFAULT_MAX_NEW_TOKENS = 128
# torch.Generator.manual_seed's range; the server's `seed` field takes the same.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1

# Every keyword generate() and stream() take besides input_ids, in the order help() lists them.
GENERATE_KEYWORDS = (
    "attention_mask",
    "max_new_tokens",
    "max_length",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "eos_token_id",
    "stop_strings",
    "seed",
    "acceptance",
    "generation_config",
    "tokenizer",
    "pad_token_id",
)

# transformers keywords people reach for that have no counterpart here, with what to do instead.
_UNSUPPORTED_HINTS = {
    "num_beams": "speculative decoding samples or decodes greedily, it has no beam search",
    "num_return_sequences": "call generate once per sequence, with a different seed each time",
    "streamer": "iterate over decoder.stream(...) instead: it yields the new token ids as they are committed",
    "inputs": "pass the token ids as input_ids",
}

# GenerationConfig fields the request reads (explicit keyword arguments win over them).
_CONFIG_READ = (
    "max_new_tokens",
    "max_length",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "eos_token_id",
    "stop_strings",
)
# Fields that cannot change which tokens one unpadded sequence gets: ignored.
_CONFIG_IGNORED = frozenset(
    {
        "transformers_version",
        "_from_model_config",
        "bos_token_id",
        "pad_token_id",
        "decoder_start_token_id",
        "use_cache",
        "cache_implementation",
        "cache_config",
        "max_cache_len",
        "compile_config",
        "disable_compile",
        "low_memory",
        "return_dict_in_generate",  # GenerateOutput has .sequences like transformers' output
        "length_penalty",  # beam search only
        "early_stopping",  # beam search only
        "remove_invalid_values",
        "renormalize_logits",  # the sampling distribution is normalised anyway
        "is_assistant",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "assistant_lookbehind",
        "target_lookbehind",
        "prefill_chunk_size",
    }
)
# Fields accepted only at the value that switches them off; any other value would change the output.
_CONFIG_NEUTRAL = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": 0.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": 0,
    "diversity_penalty": 0.0,
    "guidance_scale": 1.0,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
}


@dataclass
class GenerateOutput:
    """The result of one `generate` call (and `decoder.last_output` after a `stream`).

    Attributes:
        sequences: LongTensor of shape (1, prompt length + new tokens): the prompt followed by the new
            tokens, as `transformers`' `generate` returns it.
        accept_lengths: tokens committed by each target forward, prefill first (it commits 1); a
            speculative step commits the accepted draft tokens plus the target's own bonus token.
        finish_reason: "stop" (an EOS id or a stop string ended it) or "length" (max_new_tokens,
            max_length or the target's context window did).
        num_prompt_tokens: the prompt's length; `sequences[0, num_prompt_tokens:]` are the new tokens.
        wall_time: seconds the call took, prefill included.
        step_times: seconds per target forward, prefill first.

    Properties: `new_tokens` (list of the new token ids), `num_new_tokens`, `steps` (target forwards)
    and `tau` (mean tokens per target forward; 1.0 for plain decoding).
    """

    sequences: torch.Tensor  # (1, T_prompt + T_new) like `generate`
    accept_lengths: list[int]  # tokens committed per target forward, bonus included (prefill = 1)
    finish_reason: str  # "stop" (EOS or stop string) | "length" (max_new_tokens or context window)
    num_prompt_tokens: int
    wall_time: float = 0.0  # seconds, prefill included
    step_times: list[float] = field(default_factory=list)  # seconds per target forward, prefill first

    @property
    def new_tokens(self) -> list[int]:
        """The generated token ids, without the prompt."""
        return self.sequences[0, self.num_prompt_tokens :].tolist()

    @property
    def num_new_tokens(self) -> int:
        """How many tokens were generated."""
        return self.sequences.shape[1] - self.num_prompt_tokens

    @property
    def steps(self) -> int:
        """Target forwards, prefill included."""
        return len(self.accept_lengths)

    @property
    def tau(self) -> float:
        """Mean tokens committed per target forward, bonus token included (vanilla = 1.0)."""
        return sum(self.accept_lengths) / max(len(self.accept_lengths), 1)


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: StopChecker
    sampler: PositionSampler | None  # None when decoding greedily
    acceptance: str


def prepare_prompt(input_ids, target: TargetModel) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        dtype = input_ids.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise InputError(
                f"input_ids must be an integer tensor of token ids, got dtype {dtype}: pass the tokenizer's "
                "input_ids unchanged, or convert them with .long()"
            )
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise InputError(
                    f"batch size {input_ids.shape[0]} is not supported: speculative decoding runs one sequence at a "
                    "time; call generate once per prompt (the server queues requests for you)"
                )
            input_ids = input_ids[0]
        if input_ids.dim() != 1:
            raise InputError(f"input_ids must have shape (1, T) or (T,), got {tuple(input_ids.shape)}")
        ids = input_ids.tolist()
    elif isinstance(input_ids, (list, tuple)):
        ids = list(input_ids)
        if ids and isinstance(ids[0], (list, tuple)):
            if len(ids) != 1:
                raise InputError(f"batch size {len(ids)} is not supported: pass one prompt at a time")
            ids = list(ids[0])
        try:
            ids = [operator.index(i) for i in ids]  # numpy integers too; floats and strings fail
        except TypeError:
            bad = next(i for i in ids if not _is_int(i))
            raise InputError(
                f"input_ids must hold integer token ids, got {bad!r} ({type(bad).__name__}): pass the "
                "tokenizer's input_ids unchanged"
            ) from None
    else:
        raise InputError(
            f"input_ids must be a LongTensor or a list of token ids, got {type(input_ids).__name__}"
        )
    if len(ids) == 0:
        raise InputError("the prompt is empty: pass at least one token (e.g. the BOS token)")
    bad = next((i for i in ids if not 0 <= i < target.vocab_size), None)
    if bad is not None:
        raise InputError(f"token id {bad!r} is outside the target's vocabulary (0..{target.vocab_size - 1})")
    if target.max_context and len(ids) >= target.max_context:
        raise InputError(
            f"the prompt has {len(ids)} tokens but the target's context window is {target.max_context}: "
            "shorten the prompt to leave room for new tokens"
        )
    return ids


def _is_int(value) -> bool:
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool)


def check_attention_mask(attention_mask, prompt_length: int) -> None:
    """Accept the all-ones mask a tokenizer returns for one unpadded sequence; refuse anything else."""
    if attention_mask is None:
        return
    try:
        mask = torch.as_tensor(attention_mask)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(
            f"attention_mask must be a tensor or a list of 0/1 like the tokenizer returns, got "
            f"{type(attention_mask).__name__}"
        ) from None
    if mask.dim() == 2 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 1 or mask.shape[0] != prompt_length:
        raise InputError(
            f"attention_mask has shape {tuple(mask.shape)} but the prompt has {prompt_length} tokens: pass the "
            "attention_mask the tokenizer returned with these input_ids, or none"
        )
    padded = int((mask != 1).sum())
    if padded:
        raise InputError(
            f"attention_mask masks out {padded} of the prompt's {prompt_length} positions, but padding is not "
            "supported: amphista decodes one sequence at a time. Tokenize the prompt without padding "
            "(tokenizer(text, return_tensors='pt')) or drop the padding tokens and the mask"
        )


def _unsupported(caller: str, names) -> InputError:
    names = sorted(names)
    hints = [f"{n}: {_UNSUPPORTED_HINTS[n]}" for n in names if n in _UNSUPPORTED_HINTS]
    listed = ", ".join(repr(n) for n in names)
    noun = "argument" if len(names) == 1 else "arguments"
    return InputError(
        f"{caller}() got unsupported keyword {noun} {listed}"
        + (f" ({'; '.join(hints)})" if hints else "")
        + f". Supported: input_ids, {', '.join(GENERATE_KEYWORDS)}"
    )


_MISSING = object()


def _config_settings(config) -> dict:
    """The fields of a transformers.GenerationConfig the request reads; refuse fields it cannot honour."""
    from transformers import GenerationConfig

    if not isinstance(config, GenerationConfig):
        raise InputError(
            f"generation_config must be a transformers.GenerationConfig, got {type(config).__name__}: build one "
            "with GenerationConfig(max_new_tokens=..., do_sample=..., ...) or pass the settings as keywords"
        )
    given = {k: v for k, v in config.to_diff_dict().items() if v is not None}
    refused = {
        k: v
        for k, v in given.items()
        if k not in _CONFIG_READ and k not in _CONFIG_IGNORED and _CONFIG_NEUTRAL.get(k, _MISSING) != v
    }
    if refused:
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(refused.items()))
        raise InputError(
            f"generation_config sets {shown}, which amphista cannot honour without changing the output: set "
            f"{'it' if len(refused) == 1 else 'them'} to None. From a GenerationConfig amphista reads "
            f"{', '.join(_CONFIG_READ)}"
        )
    return {k: given[k] for k in _CONFIG_READ if k in given}


def _max_new_tokens(max_new_tokens, max_length, prompt_length: int, target: TargetModel) -> int:
    if max_length is not None and (not _is_int(max_length) or max_length <= 0):
        raise InputError(
            f"max_length must be a positive integer (prompt plus new tokens), got {max_length!r}"
        )
    if max_new_tokens is None:  # as in transformers, max_new_tokens wins when both are given
        if max_length is None:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        elif max_length <= prompt_length:
            raise InputError(
                f"max_length={max_length} counts the prompt too, and the prompt already has {prompt_length} "
                f"tokens: pass a max_length above {prompt_length}, or max_new_tokens to count new tokens only"
            )
        else:
            max_new_tokens = max_length - prompt_length
    if not _is_int(max_new_tokens) or max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if target.max_context:
        max_new_tokens = min(max_new_tokens, target.max_context - prompt_length)
    return int(max_new_tokens)


def _sampling_params(do_sample, temperature, top_p, top_k) -> SamplingParams:
    if do_sample is not None and not isinstance(do_sample, bool):
        raise InputError(f"do_sample must be True or False, got {do_sample!r}")
    if temperature is None:
        temperature = 1.0 if do_sample else 0.0  # transformers samples at 1.0 unless told otherwise
    params = SamplingParams(temperature, 1.0 if top_p is None else top_p, 0 if top_k is None else top_k)
    if do_sample and params.greedy:
        raise InputError(
            "do_sample=True needs a temperature > 0, got 0: pass a positive temperature, or do_sample=False "
            "for greedy decoding"
        )
    if do_sample is False and not params.greedy:  # transformers ignores the temperature too
        params = SamplingParams(0.0, params.top_p, params.top_k)
    return params


def _eos_ids(eos_token_id, target: TargetModel) -> list[int]:
    if eos_token_id is None:
        return target.eos_token_ids()
    if _is_int(eos_token_id):
        return [int(eos_token_id)]
    try:
        return [operator.index(i) for i in eos_token_id]
    except TypeError:
        raise InputError(
            f"eos_token_id must be a token id or a list of token ids ([] for none), got {eos_token_id!r}"
        ) from None


def _sampler(seed, greedy: bool) -> PositionSampler | None:
    if seed is not None and (not _is_int(seed) or not SEED_MIN <= seed <= SEED_MAX):
        raise InputError(
            f"seed must be an integer in [-2**63, 2**64 - 1] (torch's range), or None for a random one; "
            f"got {seed!r}"
        )
    if greedy:
        return None
    return PositionSampler(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))


def build_request(
    target: TargetModel, tokenizer, input_ids, options: dict, caller: str = "generate"
) -> Request:
    """Check one generate/stream call and turn its keywords (GENERATE_KEYWORDS, plus any unknown ones,
    which are refused) into a Request. Runs once per call, never per step."""
    unknown = set(options) - set(GENERATE_KEYWORDS)
    if unknown:
        raise _unsupported(caller, unknown)
    prompt = prepare_prompt(input_ids, target)
    check_attention_mask(options.get("attention_mask"), len(prompt))
    config = options.get("generation_config")
    settings = {} if config is None else _config_settings(config)
    settings.update({k: options[k] for k in _CONFIG_READ if options.get(k) is not None})
    max_new_tokens = _max_new_tokens(
        settings.get("max_new_tokens"), settings.get("max_length"), len(prompt), target
    )
    acceptance = options.get("acceptance", "exact")
    if acceptance not in ("exact", "typical"):
        raise InputError(f"acceptance must be 'exact' (lossless) or 'typical' (lossy), got {acceptance!r}")
    params = _sampling_params(
        settings.get("do_sample"), settings.get("temperature"), settings.get("top_p"), settings.get("top_k")
    )
    eos = _eos_ids(settings.get("eos_token_id"), target)
    if options.get("tokenizer") is not None:
        tokenizer = options["tokenizer"]
    stop = StopChecker(eos, settings.get("stop_strings"), tokenizer, max_new_tokens)
    sampler = _sampler(options.get("seed"), params.greedy)
    return Request(prompt, params, max_new_tokens, stop, sampler, acceptance)


_KEYWORDS_DOC = """
        Args:
            input_ids: the prompt, one sequence: a LongTensor of shape (1, T) or (T,), or a list of ints.
                Keyword arguments straight from a tokenizer work:
                `decoder.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=64)`.
            attention_mask: accepted when it is all ones (what a tokenizer returns for one text); a mask
                with padding raises InputError, as padding is not supported. Default None.
            max_new_tokens: most new tokens to generate. Default 128 (unless max_length is given); fewer
                when the target's context window ends first. Takes precedence over max_length, as in
                transformers.
            max_length: most tokens in all, prompt included, as in transformers; used only when
                max_new_tokens is not given. Must exceed the prompt's length. Default None.
            do_sample: True samples (temperature defaults to 1.0); False decodes greedily whatever the
                temperature; None (default) lets the temperature decide (0 greedy, > 0 sampling).
            temperature: softmax temperature, >= 0. Default 0.0 (greedy), or 1.0 with do_sample=True.
            top_p: keep the smallest set of most likely tokens whose probability reaches top_p, in (0, 1].
                Default 1.0 (off).
            top_k: sample among the top_k most likely tokens; 0 (default) turns it off. Unlike
                transformers (50), top-k is off unless asked for.
            eos_token_id: a token id, or a list of them, that ends generation (the EOS token is kept);
                [] for none. Default None: the target's EOS ids (its generation config, else its config).
            stop_strings: a string or a list of strings; generation ends with the token that completes one
                (kept). Needs a tokenizer. Default None.
            seed: an integer in [-2**63, 2**64 - 1] seeding the sampler, for reproducible sampling. Default
                None: a random seed. Unused when decoding greedily.
            acceptance: how drafted tokens are accepted when sampling: "exact" (default), lossless
                rejection sampling, the output follows the target's distribution exactly; "typical",
                typical acceptance, faster and lossy. Greedy decoding is exact either way, and
                VanillaDecoder has nothing to accept.
            generation_config: a transformers.GenerationConfig. Its max_new_tokens, max_length, do_sample,
                temperature, top_p, top_k, eos_token_id and stop_strings are used where the keywords above
                are None (explicit keywords win). Fields that would change the output in ways amphista
                does not support (num_beams > 1, repetition_penalty != 1, ...) raise InputError; token ids
                and cache options are ignored. Default None.
            tokenizer: the tokenizer stop strings are matched with. Default None: the decoder's.
            pad_token_id: accepted for code written for transformers, and unused: one unpadded sequence
                has no padding. Default None.

        Any other keyword raises InputError listing these. Bad values raise InputError naming the problem
        and the fix.
"""

_GENERATE_DOC = (
    """Decode one prompt; return a GenerateOutput (also kept in `self.last_output`).

        `decoder.generate(input_ids, max_new_tokens=128)` decodes greedily; `temperature=0.7, seed=0` (or
        `do_sample=True`) samples. The output's `sequences` holds the prompt and the new tokens, like
        transformers' generate.
"""
    + _KEYWORDS_DOC
)

_STREAM_DOC = (
    """Yield the new token ids as they are committed: a list per target forward.

        `for ids in decoder.stream(input_ids, max_new_tokens=128): print(tokenizer.decode(ids), end="")`.
        When the generator is exhausted, `self.last_output` holds the GenerateOutput; closing it early
        (break) stops decoding and leaves `last_output` as it was. The request is checked when iteration
        starts, so errors surface at the first `next()`.
"""
    + _KEYWORDS_DOC
)


class Decoder:
    """Base of VanillaDecoder and SpeculativeDecoder: one sequence at a time.

    Args:
        target: a Hugging Face causal LM (or a TargetModel wrapping one).
        tokenizer: used for stop strings; default None: the tokenizer the target was loaded with, if any.

    `generate(...)` returns a GenerateOutput; `stream(...)` yields the new tokens as they come.
    `last_output` holds the result of the latest finished call.
    """

    def __init__(self, target, tokenizer=None):
        self.target = TargetModel.wrap(target)
        self.tokenizer = tokenizer if tokenizer is not None else self.target.tokenizer
        self.last_output: GenerateOutput | None = None

    # Extra KV slots beyond prompt + new tokens (the speculative tree).
    extra_cache = 1

    def _request(self, input_ids, options: dict, caller: str = "generate") -> Request:
        return build_request(self.target, self.tokenizer, input_ids, options, caller)

    def _new_cache(self, request: Request) -> TreeCache:
        # Sized by the request, not by the model's context window.
        return TreeCache(
            self.target.num_layers, len(request.prompt) + request.max_new_tokens + self.extra_cache
        )

    def _run(self, request: Request) -> Iterator[list[int]]:
        """Yield the tokens committed by each target forward; return a GenerateOutput."""
        raise NotImplementedError

    def stream(
        self,
        input_ids,
        *,
        attention_mask=None,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        eos_token_id: int | list[int] | None = None,
        stop_strings: str | list[str] | None = None,
        seed: int | None = None,
        acceptance: str = "exact",
        generation_config=None,
        tokenizer=None,
        pad_token_id: int | None = None,
        **kwargs,
    ) -> Iterator[list[int]]:
        # One list, GENERATE_KEYWORDS, names what the signature spells out: nothing to keep in sync by hand.
        args = locals()
        options = {name: args[name] for name in GENERATE_KEYWORDS}
        request = self._request(input_ids, {**options, **kwargs}, "stream")
        self.last_output = yield from self._run(request)

    stream.__doc__ = _STREAM_DOC

    def generate(
        self,
        input_ids,
        *,
        attention_mask=None,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        eos_token_id: int | list[int] | None = None,
        stop_strings: str | list[str] | None = None,
        seed: int | None = None,
        acceptance: str = "exact",
        generation_config=None,
        tokenizer=None,
        pad_token_id: int | None = None,
        **kwargs,
    ) -> GenerateOutput:
        args = locals()
        options = {name: args[name] for name in GENERATE_KEYWORDS}
        request = self._request(input_ids, {**options, **kwargs}, "generate")
        gen = self._run(request)
        while True:
            try:
                next(gen)
            except StopIteration as done:
                self.last_output = done.value
                return done.value

    generate.__doc__ = _GENERATE_DOC

    def generate_batch(self, prompts, *, max_batch_size: int | None = None, **kwargs) -> list[GenerateOutput]:
        """Decode several prompts together; return one GenerateOutput per prompt, in order.

        `decoder.generate_batch([ids_a, ids_b, ids_c], max_new_tokens=64)`: prompts of any lengths (lists of
        token ids or 1-D tensors), the keywords of `generate` (help(decoder.generate)), applied to every
        prompt. One target forward per step serves every live row; each row keeps its own cache length,
        stop rules and sampler, and leaves the batch when it stops. Greedy rows equal their own `generate`;
        `seed=s` seeds row i with s + i, so sampled rows are reproducible.

        max_batch_size: most rows decoded at once (default: all prompts); the rest join as rows finish.
        """
        gen = self.stream_batch(prompts, max_batch_size=max_batch_size, **kwargs)
        while True:
            try:
                next(gen)
            except StopIteration as done:
                return done.value

    def stream_batch(self, prompts, *, max_batch_size: int | None = None, **kwargs) -> Iterator[dict[int, list[int]]]:
        """Yield {prompt index: new token ids} after every target forward; return the GenerateOutputs
        (also kept in `self.last_outputs`). Same arguments as `generate_batch`."""
        from .batch import run_batch

        self.last_outputs = yield from run_batch(self, prompts, kwargs, max_batch_size)
        return self.last_outputs

    def _output(self, request, generated, accept_lengths, reason, t0, step_times) -> GenerateOutput:
        seq = torch.tensor([request.prompt + generated], dtype=torch.long)
        return GenerateOutput(
            seq, accept_lengths, reason, len(request.prompt), time.perf_counter() - t0, step_times
        )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
