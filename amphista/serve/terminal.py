"""`amphista generate`: one completion, or an interactive chat, streamed to the terminal as tokens commit."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from ..errors import InputError
from ..generation import Decoder
from .chat import chat_prompt, encode
from .textstream import TextStream


@dataclass
class Reply:
    text: str
    tokens: int
    steps: int
    seconds: float
    finish_reason: str

    def stats(self) -> str:
        tau = self.tokens / max(self.steps, 1)
        speed = self.tokens / self.seconds if self.seconds else 0.0
        return (
            f"[{self.tokens} tokens in {self.seconds:.2f} s: {speed:.1f} tokens/s, tau {tau:.2f}, "
            f"finish {self.finish_reason}]"
        )


def run_stream(
    decoder: Decoder, prompt: list[int], stops: list[str], write=None, lstrip: bool = False, **kwargs
) -> Reply:
    """Decode `prompt`, calling write(text) with each piece of text as soon as it is safe to show."""
    text = TextStream(decoder.tokenizer, prompt, stops, lstrip=lstrip)
    pieces: list[str] = []

    def show(piece: str) -> None:
        if piece:
            pieces.append(piece)
            if write is not None:
                write(piece)

    t0 = time.perf_counter()
    tokens = steps = 0
    reason = None
    stream = decoder.stream(prompt, stop_strings=stops or None, **kwargs)
    try:
        for new in stream:
            tokens, steps = tokens + len(new), steps + 1
            show(text.push(new))
            if text.stopped:
                reason = "stop"
                break
    finally:
        stream.close()
    show(text.finish())
    reason = reason or decoder.last_output.finish_reason
    return Reply("".join(pieces), tokens, steps, time.perf_counter() - t0, reason)


def _writer(stream: bool):
    if not stream:
        return None

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    return write


def sampling_kwargs(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def complete(decoder: Decoder, args) -> int:
    prompt_text = args.prompt if args.prompt is not None else sys.stdin.read()
    prompt = encode(decoder.tokenizer, prompt_text)
    sys.stdout.write(prompt_text)
    sys.stdout.flush()
    reply = run_stream(decoder, prompt, list(args.stop or []), _writer(args.stream), **sampling_kwargs(args))
    if not args.stream:
        sys.stdout.write(reply.text)
    sys.stdout.write("\n")
    if args.stats:
        print(reply.stats(), file=sys.stderr)
    return 0


def chat(decoder: Decoder, args) -> int:
    """A multi-turn session on stdin/stdout. /reset forgets the conversation, /exit (or EOF) ends it."""
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model: /reset starts over, /exit or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("User: " if interactive else "")
        except EOFError:
            return 0
        if not line.strip():
            continue
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = list(base)
            continue
        messages.append({"role": "user", "content": line})
        rendered = chat_prompt(decoder.tokenizer, messages)
        sys.stdout.write("Assistant: ")
        sys.stdout.flush()
        try:
            reply = run_stream(
                decoder,
                rendered.ids,
                list(args.stop or []) + rendered.stop,
                _writer(args.stream),
                lstrip=True,
                **sampling_kwargs(args),
            )
        except InputError as e:  # the conversation outgrew the context window
            print(f"\n({e}; starting a new conversation)", file=sys.stderr)
            messages = list(base)
            continue
        if not args.stream:
            sys.stdout.write(reply.text)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if args.stats:
            print(reply.stats(), file=sys.stderr)
        messages.append({"role": "assistant", "content": reply.text})
