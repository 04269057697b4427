"""`amphista generate`: one completion, or an interactive chat, streamed to the terminal as tokens commit."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InputError
from .chat import chat_prompt, encode, has_chat_template
from .textstream import TextStream

if TYPE_CHECKING:  # torch stays unloaded until a model is: input is checked first, in a fraction of a second
    from ..generation import Decoder


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


ICONV_HINT = "convert it to UTF-8 first, e.g. with `iconv -f latin1 -t utf-8`"


def decode_utf8(data: bytes, where: str, offset: int = 0, line: int = 1) -> str:
    """bytes -> str, or an InputError naming `where` and the first byte that is not UTF-8, with its offset
    and line (`data` starting at byte `offset`, line `line` of the input); newlines normalized as text-mode
    reading does."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line += data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputError(
            f"{where} is not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {offset + e.start} "
            f"(line {line}, column {column}) cannot be decoded: {ICONV_HINT}"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def check_text_arg(flag: str, value: str | None) -> None:
    """Python hands undecodable command-line bytes over as lone surrogates, which no tokenizer takes."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        decode_utf8(os.fsencode(value), flag)
        raise InputError(f"{flag} is not valid text: {ICONV_HINT}") from None  # fsencode found nothing


def read_stdin_prompt() -> str:
    """The whole of stdin as the prompt, less exactly one trailing newline: the one `echo` adds."""
    buffer = getattr(sys.stdin, "buffer", None)
    text = decode_utf8(buffer.read(), "standard input") if buffer is not None else sys.stdin.read()
    return text[:-1] if text.endswith("\n") else text


def sampling_kwargs(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def complete(decoder: Decoder, args, prompt_text: str | None = None) -> int:
    if prompt_text is None:
        prompt_text = args.prompt if args.prompt is not None else read_stdin_prompt()
    if has_chat_template(decoder.tokenizer):
        print(
            "amphista: this model has a chat template, and a plain completion continues the text as written: "
            "add --chat for its answer to a message",
            file=sys.stderr,
        )
    prompt = encode(decoder.tokenizer, prompt_text)
    echoed = False

    def echo_prompt() -> None:
        nonlocal echoed
        if not echoed:
            echoed = True
            sys.stdout.write(prompt_text)
            sys.stdout.flush()

    # The prompt is echoed with the first piece of text, so that a request the decoder refuses (a prompt
    # longer than the context window) prints nothing but the error.
    stream_write = _writer(args.stream)

    def write(piece: str) -> None:
        echo_prompt()
        stream_write(piece)

    reply = run_stream(
        decoder, prompt, list(args.stop or []), write if stream_write else None, **sampling_kwargs(args)
    )
    echo_prompt()
    _finish(reply, args)
    return 0


def _finish(reply, args) -> None:
    """After a reply: its text when it was not streamed, the newline, and its stats to stderr with --stats."""
    if not args.stream:
        sys.stdout.write(reply.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        print(reply.stats(), file=sys.stderr)


class _Lines:
    """Chat input, one line at a time, numbered for error messages."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.number = 0
        self.offset = 0  # bytes read before the current line
        # Reading bytes lets a line that is not UTF-8 be reported with its offset; a terminal keeps input()
        # for its line editing.
        self.buffer = None if interactive else getattr(sys.stdin, "buffer", None)

    def read(self) -> str | None:
        """The next line without its newline; None at the end of the input."""
        self.number += 1
        if self.buffer is not None:
            data = self.buffer.readline()
            if not data:
                return None
            text = decode_utf8(data, "standard input", self.offset, self.number).rstrip("\n")
            self.offset += len(data)
            return text
        try:
            return input("User: " if self.interactive else "")
        except EOFError:
            return None
        except UnicodeDecodeError as e:
            raise InputError(
                f"standard input line {self.number} is not UTF-8 text ({e.reason}): {ICONV_HINT}"
            ) from None


def fit_turn(decoder: Decoder, base: list[dict], history: list[dict], line: str, max_new_tokens: int):
    """(messages, rendered prompt, whether the history was cleared) for the user's next turn.

    A conversation that leaves no room in the context window for --max-new-tokens more tokens continues as
    a fresh one: the system prompt and this turn only (a reply cut after a few tokens helps nobody). A turn
    that does not fit even alone is an InputError.
    """
    turn = {"role": "user", "content": line}
    messages = history + [turn]
    rendered = chat_prompt(decoder.tokenizer, messages)
    window = decoder.target.max_context
    if not window or len(rendered.ids) + max_new_tokens <= window or len(history) == len(base):
        if window and len(rendered.ids) >= window:
            raise _too_long(len(rendered.ids), window, bool(base))
        return messages, rendered, False
    messages = base + [turn]
    rendered = chat_prompt(decoder.tokenizer, messages)
    if len(rendered.ids) >= window:
        raise _too_long(len(rendered.ids), window, bool(base))
    return messages, rendered, True


def _too_long(tokens: int, window: int, has_system: bool) -> InputError:
    also = " with the system prompt" if has_system else ""
    return InputError(
        f"this message alone{also} is {tokens} tokens but the context window is {window}: send a shorter one"
    )


def chat(decoder: Decoder, args) -> int:
    """A multi-turn session on stdin/stdout. /reset forgets the conversation, /exit (or EOF) ends it. With
    --prompt, the answer to that one message (see _answer_one).

    A conversation that outgrows the context window starts over with the system prompt and the last turn
    (said on stderr). In a terminal a message that cannot fit at all is refused and the chat goes on; from a
    pipe or file it ends the chat with an error.
    """
    base = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        return _answer_one(decoder, args, base)
    messages = list(base)
    interactive = sys.stdin.isatty()
    lines = _Lines(interactive)
    if interactive:
        print("Chat with the model: /reset starts over, /exit or Ctrl-D ends.", file=sys.stderr)
    while True:
        line = lines.read()
        if line is None or line.strip() == "/exit":
            if line is None and interactive:
                sys.stderr.write("\n")  # Ctrl-D leaves the cursor after "User: "
            return 0
        if not line.strip():
            continue
        if line.strip() == "/reset":
            messages = list(base)
            continue
        try:
            messages, rendered, cleared = fit_turn(decoder, base, messages, line, args.max_new_tokens)
        except InputError as e:
            if not interactive:
                raise InputError(f"standard input line {lines.number}: {e}") from None
            print(f"({e})", file=sys.stderr)
            continue
        if cleared:
            print(
                "(the conversation no longer fits the context window: earlier turns were cleared, "
                "answering this message in a new conversation)",
                file=sys.stderr,
            )
        sys.stdout.write("Assistant: ")
        sys.stdout.flush()
        reply = _say(decoder, args, rendered)
        messages.append({"role": "assistant", "content": reply.text})


def _answer_one(decoder: Decoder, args, base: list[dict]) -> int:
    """--chat --prompt TEXT: the model's answer to TEXT, one user message (newlines and all), alone."""
    _, rendered, _ = fit_turn(decoder, base, [], args.prompt, args.max_new_tokens)
    _say(decoder, args, rendered)
    return 0


def _say(decoder: Decoder, args, rendered):
    """The assistant's reply to a rendered chat prompt, written to stdout (streamed or whole) with its
    newline, and its stats to stderr with --stats."""
    reply = run_stream(
        decoder, rendered.ids, list(args.stop or []) + rendered.stop, _writer(args.stream), lstrip=True,
        **sampling_kwargs(args),
    )  # fmt: skip
    _finish(reply, args)
    return reply
