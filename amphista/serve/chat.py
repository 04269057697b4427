"""Chat messages -> prompt token ids.

A tokenizer with a chat template (instruction-tuned models) renders the messages itself. A base model such
as the bundled stories260K has none, so we fall back to a plain-text transcript:

    <system prompt>             (only when there is one)

    User: Hello!
    Assistant: Hi, how can I help?
    User: Tell me a story.
    Assistant:

and stop generation at "\nUser:" so that the model does not write the user's next turn itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError

ROLES = ("system", "developer", "user", "assistant")
PLAIN_NAMES = {"user": "User", "assistant": "Assistant"}
PLAIN_STOP = "\nUser:"


@dataclass
class ChatPrompt:
    ids: list[int]
    stop: list[str] = field(default_factory=list)  # stop strings the template itself needs


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_plain(messages: list[dict]) -> str:
    """The fallback transcript for models without a chat template (see the module docstring)."""
    parts = []
    for m in messages:
        if m["role"] in ("system", "developer"):
            parts.append(m["content"].strip() + "\n")
        else:
            parts.append(f"{PLAIN_NAMES[m['role']]}: {m['content'].strip()}")
    return "\n".join(parts) + "\nAssistant:"


def chat_prompt(tokenizer, messages: list[dict]) -> ChatPrompt:
    """messages: [{"role": "system"|"developer"|"user"|"assistant", "content": str}, ...]"""
    if not messages:
        raise InputError("messages is empty: send at least one user message")
    for m in messages:
        if m.get("role") not in ROLES:
            raise InputError(f"unsupported message role {m.get('role')!r}: use one of {', '.join(ROLES)}")
    if has_chat_template(tokenizer):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers may return a BatchEncoding
            ids = ids["input_ids"]
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return ChatPrompt([int(i) for i in ids])
    return ChatPrompt(encode(tokenizer, render_plain(messages)), [PLAIN_STOP])


def encode(tokenizer, text: str) -> list[int]:
    """Text -> ids with the tokenizer's own special tokens (BOS for Llama-style models)."""
    # No truncation or padding arguments: a fast tokenizer then only reads its Rust state, so HTTP handlers
    # may encode while the worker thread decodes (changing those settings would race: "Already borrowed").
    return list(tokenizer(text).input_ids)
