"""Plain decoding with the same interface as SpeculativeDecoder, for A/B comparisons."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from .generation import _KEYWORDS_DOC, GENERATE_KEYWORDS, Decoder, GenerateOutput, Request, sync
from .sampling import sample, target_probs


class VanillaDecoder(Decoder):
    """Plain decoding, one target forward per token, with the same interface as SpeculativeDecoder.

    `VanillaDecoder(target, tokenizer=None).generate(input_ids, max_new_tokens=128)`: the baseline for A/B
    comparisons. It shares the speculative loop's KV cache, sampling and stopping rules, so both give the same
    greedy output, and the same distribution when sampling.

    Args:
        target: a Hugging Face causal LM (or a TargetModel wrapping one).
        tokenizer: used for stop strings; default None: the tokenizer the target was loaded with, if any.

    `generate` and `stream` take the keywords listed in `help(VanillaDecoder.generate)`.
    """

    @torch.inference_mode()
    def _run(self, request: Request) -> Iterator[list[int]]:
        target, params = self.target, request.params
        device = target.device
        t0 = time.perf_counter()
        cache = self._new_cache(request)
        ids = torch.tensor([request.prompt], device=device)
        generated: list[int] = []
        accept_lengths: list[int] = []
        step_times: list[float] = []
        pos = 0
        while True:
            ts = time.perf_counter()
            positions = torch.arange(pos, pos + ids.shape[1], device=device)[None]
            logits = target.forward(
                ids, position_ids=positions, cache=cache, logits_at=slice(-1, None)
            ).logits[0, -1]
            pos += ids.shape[1]
            if params.greedy:
                tok = int(logits.argmax())
            else:
                tok = sample(target_probs(logits, params), request.sampler, len(request.prompt) + len(generated))
            sync(device)
            step_times.append(time.perf_counter() - ts)
            emitted, reason = request.stop(generated, [tok])
            accept_lengths.append(len(emitted))
            yield emitted
            if reason:
                return self._output(request, generated, accept_lengths, reason, t0, step_times)
            ids = torch.tensor([[tok]], device=device)


def vanilla_generate(
    target,
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
    return VanillaDecoder(target, tokenizer).generate(input_ids, **options, **kwargs)


vanilla_generate.__doc__ = (
    """Plain decoding in one call: `amphista.vanilla_generate(target, input_ids, max_new_tokens=...)`.

        `target` is a Hugging Face causal LM (or a TargetModel); the rest is `VanillaDecoder(target,
        tokenizer).generate(input_ids, ...)`.
"""
    + _KEYWORDS_DOC
)
