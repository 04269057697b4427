"""OpenAI response and stream-chunk shapes for /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass


@dataclass
class Result:
    """What the worker reports when a request ends."""

    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    tau: float  # tokens per target forward (1.0 for vanilla decoding)
    seconds: float  # generation wall time, prefill included, queueing excluded

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def stats(self) -> dict:
        # Not in the OpenAI schema; clients ignore unknown fields. Lets load tests report tau.
        return {"tau": round(self.tau, 4), "seconds": round(self.seconds, 6)}


class Shapes:
    """Builds the JSON of one request's response (chat or text completion) under one id."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def full(self, text: str, result: Result) -> dict:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": result.finish_reason}
            body = self._envelope("text_completion", [choice])
        return {**body, "usage": result.usage(), "amphista": result.stats()}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return sse(self._envelope("chat.completion.chunk", [choice]))
        choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return sse(self._envelope("text_completion", [choice]))

    def usage_chunk(self, result: Result) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return sse({**self._envelope(obj, []), "usage": result.usage(), "amphista": result.stats()})


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


DONE = sse("[DONE]")
