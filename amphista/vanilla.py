"""Plain decoding with the same interface as SpeculativeDecoder, for A/B comparisons."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from .generation import Decoder, GenerateOutput, Request, sync
from .sampling import sample, target_probs


class VanillaDecoder(Decoder):
    """One target forward per token, through the same cache and stopping rules as the speculative loop."""

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
                tok = sample(target_probs(logits, params), request.generator)
            sync(device)
            step_times.append(time.perf_counter() - ts)
            emitted, reason = request.stop(generated, [tok])
            accept_lengths.append(len(emitted))
            yield emitted
            if reason:
                return self._output(request, generated, accept_lengths, reason, t0, step_times)
            ids = torch.tensor([[tok]], device=device)


def vanilla_generate(target, input_ids, **kwargs) -> GenerateOutput:
    """Plain decoding: `amphista.vanilla_generate(target, input_ids, max_new_tokens=..., temperature=...)`."""
    return VanillaDecoder(target, kwargs.pop("tokenizer", None)).generate(input_ids, **kwargs)
