"""What vanilla and speculative decoding share: request checks, outputs, generate/stream, prefill."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .errors import InputError
from .kv_cache import TreeCache
from .sampling import SamplingParams
from .stopping import StopChecker
from .target import TargetModel


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (1, T_prompt + T_new) like `generate`
    accept_lengths: list[int]  # tokens committed per target forward, bonus included (prefill = 1)
    finish_reason: str  # "stop" (EOS or stop string) | "length" (max_new_tokens or context window)
    num_prompt_tokens: int
    wall_time: float = 0.0  # seconds, prefill included
    step_times: list[float] = field(default_factory=list)  # seconds per target forward, prefill first

    @property
    def new_tokens(self) -> list[int]:
        return self.sequences[0, self.num_prompt_tokens :].tolist()

    @property
    def num_new_tokens(self) -> int:
        return self.sequences.shape[1] - self.num_prompt_tokens

    @property
    def steps(self) -> int:
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
    generator: torch.Generator | None
    acceptance: str


def prepare_prompt(input_ids, target: TargetModel) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
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
    else:
        raise InputError(
            f"input_ids must be a LongTensor or a list of token ids, got {type(input_ids).__name__}"
        )
    if len(ids) == 0:
        raise InputError("the prompt is empty: pass at least one token (e.g. the BOS token)")
    if not all(isinstance(i, int) and 0 <= i < target.vocab_size for i in ids):
        bad = next(i for i in ids if not (isinstance(i, int) and 0 <= i < target.vocab_size))
        raise InputError(f"token id {bad!r} is outside the target's vocabulary (0..{target.vocab_size - 1})")
    if target.max_context and len(ids) >= target.max_context:
        raise InputError(
            f"the prompt has {len(ids)} tokens but the target's context window is {target.max_context}: "
            "shorten the prompt to leave room for new tokens"
        )
    return ids


class Decoder:
    """Base of VanillaDecoder and SpeculativeDecoder: one sequence at a time."""

    def __init__(self, target, tokenizer=None):
        self.target = TargetModel.wrap(target)
        self.tokenizer = tokenizer if tokenizer is not None else self.target.tokenizer
        self.last_output: GenerateOutput | None = None

    # Extra KV slots beyond prompt + new tokens (the speculative tree).
    extra_cache = 1

    def _request(
        self,
        input_ids,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | list[int] | None = None,
        stop_strings: list[str] | str | None = None,
        seed: int | None = None,
        acceptance: str = "exact",
    ) -> Request:
        prompt = prepare_prompt(input_ids, self.target)
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if self.target.max_context:
            max_new_tokens = min(max_new_tokens, self.target.max_context - len(prompt))
        if acceptance not in ("exact", "typical"):
            raise InputError(
                f"acceptance must be 'exact' (lossless) or 'typical' (lossy), got {acceptance!r}"
            )
        params = SamplingParams(float(temperature), float(top_p), int(top_k))
        if eos_token_id is None:
            eos = self.target.eos_token_ids()
        else:
            eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        stop = StopChecker(eos, stop_strings, self.tokenizer, max_new_tokens)
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.target.device)
            generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        return Request(prompt, params, max_new_tokens, stop, generator, acceptance)

    def _new_cache(self, request: Request) -> TreeCache:
        # Sized by the request, not by the model's context window.
        return TreeCache(
            self.target.num_layers, len(request.prompt) + request.max_new_tokens + self.extra_cache
        )

    def _run(self, request: Request) -> Iterator[list[int]]:
        """Yield the tokens committed by each target forward; return a GenerateOutput."""
        raise NotImplementedError

    def stream(self, input_ids, **kwargs) -> Iterator[list[int]]:
        """Yield lists of new token ids as they are committed; `last_output` holds the result afterwards."""
        request = self._request(input_ids, **kwargs)
        self.last_output = yield from self._run(request)

    def generate(self, input_ids, **kwargs) -> GenerateOutput:
        request = self._request(input_ids, **kwargs)
        gen = self._run(request)
        while True:
            try:
                next(gen)
            except StopIteration as done:
                self.last_output = done.value
                return done.value

    def _output(self, request, generated, accept_lengths, reason, t0, step_times) -> GenerateOutput:
        seq = torch.tensor([request.prompt + generated], dtype=torch.long)
        return GenerateOutput(
            seq, accept_lengths, reason, len(request.prompt), time.perf_counter() - t0, step_times
        )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
