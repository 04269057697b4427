"""The one thread that owns the decoder. Requests wait in a FIFO queue and are decoded one at a time.

The decode loop keeps per-sequence state (KV cache, drafter cache), so sharing it between threads would
mix requests; a single owner thread makes isolation structural. HTTP handlers run on the asyncio loop and
talk to the worker through a `Job`: the worker pushes events onto the job's asyncio queue with
`call_soon_threadsafe`, and a handler whose client went away sets `job.cancelled`, which the worker reads
after every target forward and before starting a queued job.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..errors import AmphistaError
from .metrics import Metrics
from .responses import Result
from .textstream import TextStream

log = logging.getLogger("amphista.serve")


class QueueFull(Exception):
    pass


@dataclass
class Job:
    prompt: list[int]
    kwargs: dict  # Decoder.stream keyword arguments (max_new_tokens, temperature, ...)
    text: TextStream
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(
        default_factory=asyncio.Queue
    )  # ("text", str) | ("done", Result) | ("error", exc)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, payload) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()


class Worker:
    def __init__(self, decoder, metrics: Metrics, max_queue: int = 256):
        self.decoder, self.metrics, self.max_queue = decoder, metrics, max_queue
        self.jobs: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        return self.jobs.qsize()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        if not self.alive():
            self.thread = threading.Thread(target=self._loop, name="amphista-decoder", daemon=True)
            self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.jobs.put(None)
            self.thread.join(timeout)
        self.thread = None

    def submit(self, job: Job) -> None:
        if self.jobs.qsize() >= self.max_queue:
            raise QueueFull(f"{self.jobs.qsize()} requests are already waiting")
        self.jobs.put(job)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():  # the client left while queued
                self.metrics.finish("cancelled", started=False)
                continue
            try:
                self._serve(job)
            except BaseException:  # keep serving others; the job already got its error event
                log.exception("the decode worker caught an unexpected error")
            del job  # while idle, hold no reference to a finished request

    def _serve(self, job: Job) -> None:
        self.metrics.started(len(job.prompt))
        t0 = time.perf_counter()
        tokens, steps, reason = 0, 0, None
        stream = self.decoder.stream(job.prompt, **job.kwargs)
        try:
            for new in stream:
                tokens, steps = tokens + len(new), steps + 1
                self.metrics.step(len(new))
                delta = job.text.push(new)
                if delta:
                    job.emit("text", delta)
                if job.cancelled.is_set():
                    reason = "cancelled"
                    break
                if job.text.stopped:  # a stop string the text shows before the token-level check saw it
                    reason = "stop"
                    break
        except Exception as e:
            self.metrics.finish("error", tokens, time.perf_counter() - t0)
            if not isinstance(e, AmphistaError):
                log.exception("generation failed")
            job.emit("error", e)
            return
        finally:
            stream.close()
        seconds = time.perf_counter() - t0
        if reason == "cancelled":
            self.metrics.finish("cancelled", tokens, seconds)
            return
        out = self.decoder.last_output if reason is None else None
        tail = job.text.finish()
        if tail:
            job.emit("text", tail)
        result = Result(
            finish_reason=reason or out.finish_reason,
            prompt_tokens=len(job.prompt),
            completion_tokens=tokens,
            tau=tokens / max(steps, 1),
            seconds=seconds,
        )
        self.metrics.finish(result.finish_reason, tokens, seconds)
        job.emit("done", result)
