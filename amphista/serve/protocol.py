"""OpenAI request shapes, their validation, and OpenAI-style errors.

Status codes: 400 malformed or too deeply nested JSON, unknown fields, or a request we cannot serve (prompt
over the context window, n > 1, OpenAI features we do not implement), 401 bad API key, 404 unknown model or
route, 413 body too large, 422 schema violations (missing field, wrong type, value out of range),
503 queue full.
Every error body is {"error": {"message", "type", "param", "code"}} like the OpenAI API's.
"""

from __future__ import annotations

import json
import re
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP = 4  # as the OpenAI API
MAX_STOP_CHARS = 256
# Python's json module recurses once per nesting level, so a body of 2,000 "[" raised RecursionError. Our
# deepest legitimate shape (chat content parts) is 4 levels; the bound leaves room for clients' extras.
MAX_JSON_DEPTH = 64


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # strict: "0.5" is not a temperature and 5.0 is not a max_tokens. extra: inside messages and options
    # clients send fields we ignore (an assistant message's "refusal", "include_obfuscation").
    model_config = ConfigDict(strict=True, extra="allow")


# OpenAI request fields this server does not implement, with the values that ask for nothing (null always
# does): some clients send `"logprobs": false` or `"tools": []` whatever the caller asked, and refusing those
# would break them while serving them changes nothing.
_OFF: dict[str, tuple] = {
    "best_of": (1,),
    "suffix": ("",),
    "logit_bias": ({},),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "function_call": ("none",),
    "parallel_tool_calls": (True, False),  # only means something with tools
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "store": (False,),
    "service_tier": ("auto", "default"),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "moderation": (),
    "prompt_cache_options": (),
    "prompt_cache_retention": (),
}


def _is_off(name: str, value) -> bool:
    # Compared with the type too: 0 == False and 1 == True, but `"logprobs": 0` asks for log probabilities.
    return value is None or any(type(value) is type(v) and value == v for v in _OFF[name])


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    # Unknown and unsupported fields are refused in `parse` before validation; what passes there and is not
    # a field below is an unsupported field that asks for nothing, so it is dropped.
    model_config = ConfigDict(strict=True, extra="ignore")
    UNSUPPORTED: ClassVar[tuple[str, ...]] = ()  # the OpenAI fields of the endpoint that we do not implement

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # not in the OpenAI API; vLLM accepts it too
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"stop has {len(stops)} entries; at most {MAX_STOP} are allowed", "stop")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters", "stop")
        return stops

    def check_supported(self) -> None:
        if self.n != 1:
            raise APIError(400, f"n={self.n} is not supported: send n=1 and repeat the request", "n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise APIError(
                    400, f"{name} is not supported (lossless decoding samples the model as is)", name
                )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    UNSUPPORTED = ("best_of", "logit_bias", "logprobs", "suffix")

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(
                    400, f"{len(p)} prompts in one request are not supported: send one per request", "prompt"
                )
            p = p[0]
        if isinstance(p, list) and not p:
            raise APIError(400, "the prompt is empty", "prompt")
        return p


class TextPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if isinstance(self.content, str) or self.content is None:
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(
                    400,
                    f"content part of type {part.type!r} is not supported: this model reads text",
                    f"messages[{index}].content",
                )
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    UNSUPPORTED = tuple(sorted(set(_OFF) - {"best_of", "suffix"}))

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # Labels that do not change the completion, accepted and ignored like `user`.
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None

    def message_dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)


def nesting_depth_over(text: str, limit: int) -> bool:
    """Whether the JSON text opens more than `limit` arrays/objects inside each other (brackets in strings
    do not count)."""
    if text.count("[") + text.count("{") <= limit:  # the common case, without a scan
        return False
    depth = 0
    for m in _STRING_OR_BRACKET.finditer(text):
        c = text[m.start()]
        if c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth -= 1
    return False


def check_fields(model: type[_Sampling], data: dict) -> None:
    """A 400 naming every field the endpoint does not know or does not implement (docs/serving.md)."""
    unknown = [k for k in data if k not in model.model_fields and k not in model.UNSUPPORTED]
    unsupported = [k for k in data if k in model.UNSUPPORTED and not _is_off(k, data[k])]
    if not unknown and not unsupported:
        return
    problems = []
    if unsupported:
        problems.append(
            f"{', '.join(unsupported)} {'is' if len(unsupported) == 1 else 'are'} not supported by this server"
        )
    if unknown:
        problems.append(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    supported = ", ".join(sorted(model.model_fields))
    raise APIError(
        400,
        f"{'; '.join(problems)}. Supported fields: {supported}",
        (unsupported + unknown)[0],
        "unsupported_field" if unsupported else "unknown_field",
    )


def parse(model: type[_Sampling], raw: bytes):
    """Body bytes -> a validated request, or an APIError naming the field."""
    try:
        text = raw.decode("utf-8")
        if nesting_depth_over(text, MAX_JSON_DEPTH):
            raise APIError(
                400,
                f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep",
                code="invalid_json",
            )
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    check_fields(model, data)
    try:
        return model.model_validate_json(text)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise APIError(422, f"{param}: {err['msg']}{more}", param, err["type"]) from None
