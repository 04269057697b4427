"""The decoding methods a benchmark compares, behind one call: answer one turn, timed the same way.

- "vanilla_loop": the project's own plain loop (`VanillaDecoder`), also the reference for exactness;
- "vanilla_hf": `transformers` `generate()` on the same model;
- one `SpeculativeDecoder` per drafter (and per tree size in a sweep);
- any object with `.generate(input_ids, **kwargs) -> GenerateOutput` (custom methods, tests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..generation import sync
from ..target import TargetModel
from ..vanilla import VanillaDecoder

LOOP, HF = "vanilla_loop", "vanilla_hf"
VANILLA = (LOOP, HF)


@dataclass
class Settings:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class TurnOutput:
    tokens: list[int]  # new tokens only
    wall_time: float  # seconds, prefill included, measured around the whole call
    accept_lengths: list[int]  # per target forward, bonus included, prefill first (counts 1)
    step_times: list[float]  # seconds per target forward, prefill first
    finish_reason: str = ""
    # Per decode step (prefill excluded), seconds in (draft, tree forward, verification, cache commit):
    # speculative methods whose decoder profiles its steps (SpeculativeDecoder.profile_steps); else None.
    step_parts: list[tuple[float, float, float, float]] | None = None
    # Per decode step, the tokens it verified (the tree's nodes, root included; 1: plain decoding), speculative
    # methods; else None. With tree="auto" the size is chosen step by step.
    step_nodes: list[int] | None = None


@dataclass
class Method:
    """A named way to answer a turn. `kind`: "vanilla" | "speculative" | "custom"."""

    name: str
    runner: object  # a Decoder-like object, or the target for `transformers` generate
    kind: str = "custom"
    info: dict = field(default_factory=dict)  # drafter config, tree, where it came from

    def run(self, target: TargetModel, prompt: list[int], s: Settings) -> TurnOutput:
        if self.name == HF:
            return _hf_generate(target, prompt, s)
        kwargs = dict(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=s.seed,
        )
        sync(target.device)
        t0 = time.perf_counter()
        out = self.runner.generate(prompt, **kwargs)
        sync(target.device)
        wall = time.perf_counter() - t0
        parts = list(self.runner.last_step_parts) if getattr(self.runner, "profile_steps", False) else None
        nodes = getattr(self.runner, "last_step_nodes", None)
        if nodes is None and getattr(self.runner, "tree_nodes", None) is not None:  # a decoder of one tree size
            nodes = [self.runner.tree_nodes] * (len(out.step_times) - 1)
        return TurnOutput(
            out.new_tokens, wall, list(out.accept_lengths), list(out.step_times), out.finish_reason, parts,
            None if nodes is None else list(nodes),
        )


def vanilla_methods(target: TargetModel, hf: bool = True) -> list[Method]:
    methods = [Method(LOOP, VanillaDecoder(target), "vanilla", {"implementation": "amphista.VanillaDecoder"})]
    if hf:
        methods.append(Method(HF, target, "vanilla", {"implementation": "transformers generate()"}))
    return methods


class _StepClock:
    """A `generate()` streamer that only notes the time of each put: the prompt first, then one put per
    new token, so consecutive differences are the per-forward latencies."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_generate(target: TargetModel, prompt: list[int], s: Settings) -> TurnOutput:
    from transformers import GenerationConfig

    device = target.device
    max_new = s.max_new_tokens
    if target.max_context:  # the same cap the project's decoders apply
        max_new = min(max_new, target.max_context - len(prompt))
    eos = target.eos_token_ids()
    # A fresh config, so sampling defaults a checkpoint ships (e.g. top_k=50) cannot slip in.
    sampling = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k} if s.temperature > 0 else {}
    gen = GenerationConfig(
        max_new_tokens=max_new,
        do_sample=s.temperature > 0,
        eos_token_id=eos or None,
        pad_token_id=eos[0] if eos else 0,
        **sampling,
    )
    ids = torch.tensor([prompt], device=device)
    # On an accelerator the streamer's per-token copy to the host would slow the baseline a little;
    # there the step latencies are left out rather than bought with a slower vanilla.
    clock = _StepClock() if device.type == "cpu" else None
    if s.temperature > 0 and s.seed is not None:
        torch.manual_seed(s.seed)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        seq = target.model.generate(
            ids, attention_mask=torch.ones_like(ids), generation_config=gen, streamer=clock
        )
    sync(device)
    wall = time.perf_counter() - t0
    tokens = seq[0, len(prompt) :].tolist()
    steps = []
    if clock is not None:
        stamps = [t0] + clock.times[1:]  # the prompt's put comes before the prefill forward
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
    reason = "stop" if tokens and tokens[-1] in eos else "length"
    return TurnOutput(tokens, wall, [1] * len(tokens), steps, reason)
