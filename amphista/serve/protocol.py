"""OpenAI request shapes, their validation, and OpenAI-style errors.

Status codes: 400 malformed JSON or a request we cannot serve (prompt over the context window, n > 1,
features we do not implement), 401 bad API key, 404 unknown model or route, 413 body too large,
422 schema violations (missing field, wrong type, value out of range), 503 queue full.
Every error body is {"error": {"message", "type", "param", "code"}} like the OpenAI API's.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP = 4  # as the OpenAI API
MAX_STOP_CHARS = 256


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # strict: "0.5" is not a temperature and 5.0 is not a max_tokens. extra: clients send fields we ignore.
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
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
        for name in ("logprobs", "top_logprobs", "logit_bias", "tools", "functions", "suffix"):
            if (self.model_extra or {}).get(name) not in (None, False, {}, []):
                raise APIError(400, f"{name} is not supported by this server", name)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
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
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def message_dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse(model: type[_Strict], raw: bytes):
    """Body bytes -> a validated request, or an APIError naming the field."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise APIError(422, f"{param}: {err['msg']}{more}", param, err["type"]) from None
