"""The one thread that owns the decoder. Requests wait in a FIFO queue; the worker decodes up to
`max_batch_size` of them together (continuous batching) or, at 1, one at a time.

The decode loop keeps per-sequence state (KV cache, drafter cache), so sharing it between threads would
mix requests; a single owner thread makes isolation structural. HTTP handlers run on the asyncio loop and
talk to the worker through a `Job`: the worker pushes events onto the job's asyncio queue with
`call_soon_threadsafe`, and a handler whose client went away sets `job.cancelled`, which the worker reads
after every target forward and before starting a queued job.

With batching the worker owns a `BatchEngine`: between steps it admits queued jobs while rows are free,
then runs one target forward for every live row and routes each row's tokens to its job. A row leaves at
once when it finishes, hits a stop string in its text, or its client leaves, so a waiting job takes its
place at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..batch import BatchEngine, RowEvent
from ..errors import AmphistaError, InputError
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


@dataclass
class _Row:
    """A job decoding in the batch."""

    job: Job
    t0: float
    tokens: int = 0
    forwards: int = 1  # target forwards that served it, its prefill first
    reported: bool = False  # its first event (which carries the prefill's token) has come


class Worker:
    def __init__(self, decoder, metrics: Metrics, max_queue: int = 256, max_batch_size: int = 1):
        self.decoder, self.metrics, self.max_queue = decoder, metrics, max_queue
        self.jobs: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.engine: BatchEngine | None = None
        if max_batch_size > 1:
            try:
                self.engine = self._new_engine(max_batch_size)
            except InputError as e:  # a drafter without batched decoding still serves, one request at a time
                log.warning("batched decoding is off, requests are decoded one at a time: %s", e)
                max_batch_size = 1
        self.max_batch_size = max_batch_size
        self.on_caller = False  # decoding on a thread the caller gives (run), not one of the worker's own
        self.running = False  # run() is decoding
        self.rows = 0  # sequences being decoded now, for /metrics
        self.admitting = 0  # jobs taken from the queue whose prefill is running
        self.busy_since = 0.0  # when the latest decode pass ended, or the worker woke up

    @property
    def depth(self) -> int:
        return self.jobs.qsize()

    def _new_engine(self, rows: int) -> BatchEngine:
        # Not ragged: a finished row's slot takes the next request, so no row waits for another (TreePolicy.margin).
        return BatchEngine(self.decoder, rows, ragged=False)

    def alive(self) -> bool:
        return self.running or (self.thread is not None and self.thread.is_alive())

    def start(self) -> None:
        """Decode on a thread of the worker's own (what the app's lifespan calls), unless `run` decodes."""
        if not self.on_caller and not self.alive():
            self.thread = threading.Thread(target=self._decode, name="amphista-decoder", daemon=True)
            self.thread.start()

    def run(self) -> None:
        """Decode on the calling thread until `stop`; set `on_caller` first when the app may start meanwhile.
        `amphista serve` decodes on its main thread, the one that loaded the model and measured its costs:
        torch's OpenMP worker threads serve the thread whose parallel regions came first, and another thread's
        ran a packed few-row linear 2.3x slower (105 against 46 us, two threads), which took 15-30% off
        every step of SmolLM2 served from a thread of the worker's own."""
        self.on_caller = self.running = True
        try:
            self._decode()
        finally:
            self.running = False

    def _decode(self) -> None:
        (self._loop if self.engine is None else self._batch_loop)()

    def stop(self, timeout: float = 10.0) -> None:
        """No new jobs; the rows being decoded finish. Waits for a thread of the worker's own."""
        if self.on_caller or self.alive():
            self.jobs.put(None)
            if self.thread is not None:
                self.thread.join(timeout)
        self.thread = None

    def submit(self, job: Job) -> None:
        if self.jobs.qsize() >= self.max_queue:
            raise QueueFull(f"{self.jobs.qsize()} requests are already waiting")
        self.jobs.put(job)

    def _fail(self, job: Job, e: BaseException, tokens: int, seconds: float) -> None:
        self.metrics.finish("error", tokens, seconds)
        if not isinstance(e, AmphistaError):
            log.error("generation failed", exc_info=e)
        job.emit("error", e)

    def _busy(self, tokens: int) -> None:
        now = time.perf_counter()
        self.metrics.busy(tokens, now - self.busy_since)
        self.busy_since = now

    # --- one request at a time -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():  # the client left while queued
                self.metrics.finish("cancelled", started=False)
                continue
            self.rows = 1
            try:
                self._serve(job)
            except BaseException:  # keep serving others; the job already got its error event
                log.exception("the decode worker caught an unexpected error")
            finally:
                self.rows = 0
            del job  # while idle, hold no reference to a finished request

    def _serve(self, job: Job) -> None:
        self.metrics.started(len(job.prompt))
        t0 = self.busy_since = time.perf_counter()
        tokens, steps, reason = 0, 0, None
        stream = self.decoder.stream(job.prompt, **job.kwargs)
        try:
            for new in stream:
                tokens, steps = tokens + len(new), steps + 1
                self.metrics.step(len(new))
                self._busy(len(new))
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
            self._fail(job, e, tokens, time.perf_counter() - t0)
            return
        finally:
            stream.close()
        seconds = time.perf_counter() - t0
        if reason == "cancelled":
            self.metrics.finish("cancelled", tokens, seconds)
            return
        out = self.decoder.last_output if reason is None else None
        self._done(job, reason or out.finish_reason, tokens, steps, seconds)

    def _done(self, job: Job, reason: str, tokens: int, forwards: int, seconds: float) -> None:
        tail = job.text.finish()
        if tail:
            job.emit("text", tail)
        result = Result(
            finish_reason=reason,
            prompt_tokens=len(job.prompt),
            completion_tokens=tokens,
            tau=tokens / max(forwards, 1),
            seconds=seconds,
        )
        self.metrics.finish(result.finish_reason, tokens, seconds)
        job.emit("done", result)

    # --- continuous batching -----------------------------------------------------------------------

    def _batch_loop(self) -> None:
        live: dict[int, _Row] = {}  # row id -> its job, for every row whose end the job has not yet heard
        accepting = True
        with torch.inference_mode():  # the engine's caches are inference tensors; `cancel` writes them too
            while accepting or live:
                if accepting:
                    accepting = self._admit_waiting(live, block=not live)
                if live:
                    self._busy(self._step(live))
                self.rows = len(self.engine)

    def _admit_waiting(self, live: dict[int, _Row], block: bool) -> bool:
        """Admit queued jobs while rows are free, first waiting for one when `block` (the worker is idle);
        the jobs taken together are prefilled in one forward. False once the stop sentinel came: the rows
        already admitted finish, nothing more joins."""
        while True:  # jobs that queued during a prefill join before the next step too
            joining, accepting = self._take(block)
            if joining:
                self.admitting = len(joining)
                try:
                    self._prefill(live, joining)
                finally:
                    self.admitting = 0
            if not joining or not accepting:
                return accepting
            block = False

    def _take(self, block: bool) -> tuple[list, bool]:
        """(queued jobs for the free rows, each with its checked request; False once the stop sentinel came)."""
        joining: list[tuple[Job, object]] = []
        accepting = True
        while len(self.engine) + len(joining) < self.max_batch_size:
            try:
                job = self.jobs.get(block=block)
            except queue.Empty:
                break
            if block:
                self.busy_since, block = time.perf_counter(), False
            if job is None:
                accepting = False
                break
            if job.cancelled.is_set():  # the client left while queued
                self.metrics.finish("cancelled", started=False)
                continue
            self.metrics.started(len(job.prompt))
            try:
                joining.append((job, self.decoder._request(job.prompt, job.kwargs, "stream")))
            except Exception as e:  # a bad request fails alone, before anything is prefilled
                self._fail(job, e, 0, 0.0)
        return joining, accepting

    def _prefill(self, live: dict[int, _Row], joining: list) -> None:
        """Prefill jobs together; when that fails, one at a time, so that a failing prompt fails alone. The
        live rows are untouched either way."""
        t0 = time.perf_counter()
        try:
            ids = self.engine.add_requests([request for _, request in joining])
        except Exception as e:
            if len(joining) == 1:
                self._fail(joining[0][0], e, 0, time.perf_counter() - t0)
            else:
                for pair in joining:
                    self._prefill(live, [pair])
            return
        for (job, _), rid in zip(joining, ids):
            live[rid] = _Row(job, t0)

    def _step(self, live: dict[int, _Row]) -> int:
        """One target forward for every live row; route the events; drop rows whose client left. Returns
        the tokens committed. An unexpected error fails every live row and starts a fresh engine: the
        engine's state is then unknown, and the worker must go on serving."""
        try:
            stepped = set(self.engine.ids)  # not the rows that finished at prefill: no forward serves them
            events = self.engine.step()
            for rid in stepped:
                live[rid].forwards += 1
            for event in events:
                row = live[event.id]
                try:
                    done = self._route(event, row, event.id in stepped)
                except Exception as e:  # this row's text handling broke: end it alone
                    self.engine.cancel(event.id)
                    done = True
                    self._fail(row.job, e, row.tokens, time.perf_counter() - row.t0)
                if done:
                    del live[event.id]
            for rid in [rid for rid, row in live.items() if row.job.cancelled.is_set()]:
                self.engine.cancel(rid)  # its slot is free for the next admission
                row = live.pop(rid)
                self.metrics.finish("cancelled", row.tokens, time.perf_counter() - row.t0)
            return sum(len(event.tokens) for event in events)
        except Exception as e:
            log.exception("batched decoding failed; failing its %d requests", len(live))
            now = time.perf_counter()
            for row in live.values():
                self.metrics.finish("error", row.tokens, now - row.t0)
                row.job.emit("error", e)
            live.clear()
            self.engine = self._new_engine(self.max_batch_size)
            return 0

    def _route(self, event: RowEvent, row: _Row, stepped: bool) -> bool:
        """Hand one row's new tokens to its job; True when the row has ended."""
        n = len(event.tokens)
        if not row.reported:  # the prefill's token rides with the row's first event
            self.metrics.step(1)
            n, row.reported = n - 1, True
        if stepped:
            self.metrics.step(n)
        row.tokens += len(event.tokens)
        job = row.job
        delta = job.text.push(event.tokens)
        if delta:
            job.emit("text", delta)
        if event.output is not None:
            reason = event.output.finish_reason
        elif job.text.stopped:  # a stop string the text shows before the token-level check saw it
            self.engine.cancel(event.id)
            reason = "stop"
        else:
            return False
        self._done(job, reason, row.tokens, row.forwards, time.perf_counter() - row.t0)
        return True
