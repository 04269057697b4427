"""The OpenAI-compatible HTTP server: `create_app(decoder_or_target, drafter=None, ...) -> FastAPI`.

Routes are module-level handlers over the app's `Server` (app.state.server). Handlers read the body on the
event loop, then parse, tokenize and check it in a thread (a 1 MiB prompt takes a tokenizer long enough to
stall every other client, /health included), and enqueue; the `Worker` thread decodes, up to
`max_batch_size` requests together. See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decoder import SpeculativeDecoder
from ..errors import InputError
from ..generation import Decoder
from ..target import TargetModel
from ..vanilla import VanillaDecoder
from .chat import chat_prompt, encode
from .gate import Gate
from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest, parse
from .responses import DONE, Shapes, sse
from .textstream import TextStream
from .worker import Job, QueueFull, Worker

COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI default for /v1/completions
MAX_RETRY_AFTER = 60  # seconds; a longer estimate would only keep a client away from a queue that has room


def build_decoder(decoder_or_target, drafter=None, tree="mc_sim_7b_63") -> Decoder:
    if isinstance(decoder_or_target, Decoder):
        return decoder_or_target
    target = TargetModel.wrap(decoder_or_target)
    return VanillaDecoder(target) if drafter is None else SpeculativeDecoder(target, drafter, tree)


def default_model_name(decoder: Decoder) -> str:
    return Path(decoder.target.name_or_path.rstrip("/")).name or decoder.target.architecture


@dataclass
class Server:
    """What every route of one app shares (`app.state.server`): the decoder, its worker thread and metrics,
    and the request limits."""

    decoder: Decoder
    worker: Worker
    metrics: Metrics
    name: str  # the model id clients must ask for
    max_body_bytes: int
    token_limit: int  # most new tokens one request may ask for

    @property
    def tokenizer(self):
        return self.decoder.tokenizer

    @property
    def context(self) -> int | None:
        return self.decoder.target.max_context

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "amphista"}

    def check_model(self, model_id: str) -> None:
        if model_id != self.name:
            raise APIError(
                404,
                f"model {model_id!r} does not exist; this server serves {self.name!r}",
                "model",
                "model_not_found",
            )

    async def read_body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body has {declared} bytes; the limit is {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body exceeds the limit of {limit} bytes")
        return bytes(body)

    def generation_args(self, req, prompt: list[int], stops: list[str], requested: int | None, default: int):
        if requested is not None and requested > self.token_limit:
            raise APIError(
                400, f"max_tokens={requested} is over this server's limit of {self.token_limit}", "max_tokens"
            )
        context, vocab = self.context, self.decoder.target.vocab_size
        if context and len(prompt) >= context:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens but the model's context window is {context}: "
                "shorten the prompt",
                "messages" if isinstance(req, ChatRequest) else "prompt",
                "context_length_exceeded",
            )
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt")
        return dict(
            max_new_tokens=requested or default,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            stop_strings=stops or None,
            seed=req.seed,
        )

    def prepare(self, raw: bytes, chat: bool):
        """The CPU-heavy part of a request (JSON, chat template, tokenizer), run off the event loop."""
        req = parse(ChatRequest if chat else CompletionRequest, raw)
        self.check_model(req.model)
        req.check_supported()
        stops = req.stop_list()
        echo = ""
        if chat:
            try:
                rendered = chat_prompt(self.tokenizer, req.message_dicts())
            except InputError as e:
                raise APIError(400, str(e), "messages") from None
            prompt, stops = rendered.ids, stops + rendered.stop
            requested, default = req.token_limit, self.token_limit
        else:
            p = req.single_prompt()
            prompt = encode(self.tokenizer, p) if isinstance(p, str) else list(p)
            requested, default = req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS
            if req.echo:
                echo = p if isinstance(p, str) else self.tokenizer.decode(prompt, skip_special_tokens=True)
        return req, prompt, stops, echo, self.generation_args(req, prompt, stops, requested, default)

    async def handle(self, request: Request, chat: bool):
        raw = await self.read_body(request)
        req, prompt, stops, echo, kwargs = await run_in_threadpool(self.prepare, raw, chat)
        text = TextStream(self.tokenizer, prompt, stops, lstrip=chat)
        job = Job(prompt, kwargs, text, asyncio.get_running_loop())
        try:
            self.worker.submit(job)
        except QueueFull as e:
            raise APIError(
                503,
                f"the server is busy ({e}); retry later",
                type="server_error",
                code="queue_full",
                headers={"Retry-After": str(retry_after(self.metrics))},
            ) from None
        shapes = Shapes(chat, self.name)
        if req.stream:
            return StreamingResponse(
                stream(job, shapes, echo, req.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await collect(request, job, shapes, echo)


def create_app(
    decoder_or_target,
    drafter=None,
    *,
    tree="mc_sim_7b_63",
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    max_tokens_limit: int | None = None,
    max_queue: int = 256,
    max_batch_size: int = 8,
) -> FastAPI:
    """An app serving one model. `decoder_or_target`: a VanillaDecoder/SpeculativeDecoder, or a target
    (TargetModel, model directory, transformers model) decoded with `drafter` (None: vanilla decoding).
    `max_batch_size`: most requests decoded together (continuous batching); 1 decodes one at a time, as
    does a drafter without batched decoding (a warning is logged)."""
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise InputError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    decoder = build_decoder(decoder_or_target, drafter, tree)
    if decoder.tokenizer is None:
        raise InputError("the server needs a tokenizer: load the target from a folder that has one")
    heads = getattr(getattr(decoder, "drafter", None), "num_heads", 0)
    worker = Worker(decoder, None, max_queue, max_batch_size)
    metrics = Metrics(heads + 1, lambda: worker.depth, lambda: worker.rows, worker.max_batch_size)
    worker.metrics = metrics
    server = Server(
        decoder,
        worker,
        metrics,
        model_name or default_model_name(decoder),
        max_body_bytes,
        max_tokens_limit or decoder.target.max_context or 4096,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="amphista", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(Gate, api_key=api_key, metrics=metrics)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.include_router(router)
    return app


def server_of(request: Request) -> Server:
    return request.app.state.server


async def api_error(request: Request, exc: APIError):
    return JSONResponse(exc.body(), exc.status, headers=exc.headers)


async def http_error(request: Request, exc: StarletteHTTPException):
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(APIError(exc.status_code, message).body(), exc.status_code)


async def server_error(request: Request, exc: Exception):
    body = APIError(500, f"internal error ({type(exc).__name__}); see the server log", type="server_error")
    return JSONResponse(body.body(), 500)


router = APIRouter()


@router.get("/health")
async def health(request: Request):
    worker = server_of(request).worker
    ok = worker.alive()
    body = {"status": "ok" if ok else "worker stopped", "queue_depth": worker.depth}
    return JSONResponse(body, 200 if ok else 503)


@router.get("/metrics")
async def prometheus(request: Request):
    return PlainTextResponse(server_of(request).metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [server_of(request).model_card()]}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str):
    server = server_of(request)
    server.check_model(model_id)
    return server.model_card()


@router.post("/v1/completions")
async def completions(request: Request):
    return await server_of(request).handle(request, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await server_of(request).handle(request, chat=True)


async def stream(job: Job, shapes: Shapes, echo: str, include_usage: bool):
    """Server-sent events of one job: its text as it comes, its finish reason (and usage), then [DONE]."""
    try:
        if shapes.chat:
            yield shapes.chunk(role=True)
        elif echo:
            yield shapes.chunk(echo)
        while True:
            kind, payload = await job.events.get()
            if kind == "text":
                yield shapes.chunk(payload)
            elif kind == "error":
                yield sse(error_of(payload).body())
                break
            else:
                yield shapes.chunk(finish_reason=payload.finish_reason)
                if include_usage:
                    yield shapes.usage_chunk(payload)
                break
        yield DONE
    finally:  # done, or the client disconnected (the task is cancelled): either way stop decoding for it
        job.cancelled.set()


async def collect(request: Request, job: Job, shapes: Shapes, echo: str):
    """One JSON response with the whole text; 499 (to nobody) where the client left first."""
    left = asyncio.ensure_future(wait_for_disconnect(request))
    parts = [echo]
    try:
        while True:
            get = asyncio.ensure_future(job.events.get())
            await asyncio.wait({get, left}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                return JSONResponse({}, 499)  # nobody reads it; the worker drops the job
            kind, payload = get.result()
            if kind == "text":
                parts.append(payload)
            elif kind == "error":
                raise error_of(payload)
            else:
                return JSONResponse(shapes.full("".join(parts), payload))
    finally:
        left.cancel()
        job.cancelled.set()


def retry_after(metrics: Metrics) -> int:
    """Seconds a client turned away by a full queue should wait: a place frees when a running generation
    ends. A full queue means a full batch, whose rows end one every (recent generation time / batch size)
    seconds on average (1 to MAX_RETRY_AFTER)."""
    estimate = metrics.mean_generation_seconds() / metrics.max_batch_size
    return min(MAX_RETRY_AFTER, max(1, math.ceil(estimate)))


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def error_of(exc: Exception) -> APIError:
    if isinstance(exc, InputError):
        return APIError(400, str(exc))
    return APIError(500, f"generation failed ({type(exc).__name__}: {exc})", type="server_error")
