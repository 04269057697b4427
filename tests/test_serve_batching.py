"""Continuous batching in `amphista serve`: concurrent requests share target forwards, and each gets exactly
the text it gets alone.

A `Probe` stands in for the target: it records the batch width of every forward, can hold forwards at a
gate (so that requests are known to be queued together, whatever the machine's speed), slow them down
(so that a generation outlasts a client that hangs up) and fail them on demand."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_serve import AUTH, KEY, Server, wait_for

import amphista
from amphista.cli import build_parser
from amphista.serve import create_app
from amphista.serve.chat import PLAIN_STOP, chat_prompt, encode
from amphista.serve.loading import resolve_tree
from amphista.serve.textstream import continuation_text

PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went", "She saw a big", "One day", "Lily"]
QUESTIONS = ["Hello!", "Tell me a story about a cat."]
MODEL = "stories260K"


class Probe:
    """The target, with a record of each forward's batch width, a gate, a delay and a failure switch."""

    def __init__(self, target):
        self._target = target
        self.widths: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0
        self.fail = lambda tokens: False  # tokens (B, q) -> raise instead of running this forward

    def forward(self, tokens, **kwargs):
        assert self.gate.wait(60), "the test never opened the gate"
        self.widths.append(tokens.shape[0])
        if self.fail(tokens):
            raise RuntimeError("the target broke")
        if self.delay:
            time.sleep(self.delay)
        return self._target.forward(tokens, **kwargs)

    def __getattr__(self, name):
        return getattr(self._target, name)


@pytest.fixture(scope="module")
def target():
    return amphista.load_default_target()


def vanilla(target) -> amphista.VanillaDecoder:
    decoder = amphista.VanillaDecoder(target)
    decoder.target = Probe(decoder.target)
    return decoder


def speculative(target) -> amphista.SpeculativeDecoder:
    path = amphista.bundled.default_drafter_path("amphista")
    drafter = amphista.drafters.load_drafter(path, target)
    if not getattr(drafter, "supports_rows", False):
        pytest.skip("the bundled Amphista drafter does not support batched decoding yet (supports_rows)")
    decoder = amphista.SpeculativeDecoder(target, drafter, resolve_tree(None, path))
    decoder.target = Probe(decoder.target)
    return decoder


def requests(n: int) -> list[tuple[str, dict]]:
    """n mixed requests (chat and completion, streaming and not), each with its own max_tokens."""
    out = []
    for i in range(n):
        chat, stream, max_tokens = i % 2 == 1, i % 4 >= 2, 3 + 5 * i
        body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": QUESTIONS[i // 2 % len(QUESTIONS)]}]
        else:
            body["prompt"] = PROMPTS[i // 2 % len(PROMPTS)]
        out.append(("/v1/chat/completions" if chat else "/v1/completions", body))
    return out


def send(url: str, path: str, body: dict) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens or -1 when streamed) of one request."""
    chat = "messages" in body
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as http:
        if not body.get("stream"):
            r = http.post(path, json=body)
            assert r.status_code == 200, r.text
            data = r.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            return text, choice["finish_reason"], data["usage"]["completion_tokens"]
        with http.stream("POST", path, json=body) as r:
            events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1  # one response per stream, nobody else's chunks
    choices = [c["choices"][0] for c in chunks]
    text = "".join((c["delta"].get("content") or "") if chat else c["text"] for c in choices)
    return text, choices[-1]["finish_reason"], -1


def reference(target, body: dict) -> tuple[str, str]:
    """(text, finish_reason) a request must get: plain greedy decoding of its prompt alone, cut like the
    server cuts it."""
    tok, decoder = target.tokenizer, amphista.VanillaDecoder(target)
    chat = "messages" in body
    prompt = chat_prompt(tok, body["messages"]).ids if chat else encode(tok, body["prompt"])
    stops = [PLAIN_STOP] if chat else body.get("stop", [])
    out = decoder.generate(
        prompt, max_new_tokens=body["max_tokens"], temperature=0, stop_strings=stops or None
    )
    text = continuation_text(tok, prompt, out.new_tokens)
    text = text.lstrip() if chat else text
    cut = min((text.index(s) for s in stops if s in text), default=len(text))
    return text[:cut], out.finish_reason


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers=AUTH).text
    return float(next(ln.split()[1] for ln in text.splitlines() if ln.split()[0] == name))


def concurrently(app, url: str, reqs: list[tuple[str, dict]]) -> list[tuple[str, str, int]]:
    """Send every request at once, with the decoder held until all are queued: they decode as one batch."""
    probe, worker = app.state.server.decoder.target, app.state.server.worker
    probe.gate.clear()
    with ThreadPoolExecutor(len(reqs)) as pool:
        futures = [pool.submit(send, url, path, body) for path, body in reqs]
        # The first requests' prefill waits at the gate (one at a time without batching); the others wait in
        # the queue.
        held = lambda: max(worker.admitting, 1)  # noqa: E731
        wait_for(lambda: worker.depth + held() == len(reqs), "the requests never all reached the queue")
        probe.widths.clear()
        probe.gate.set()
        return [f.result() for f in futures]


@pytest.mark.parametrize("make", [vanilla, speculative], ids=["vanilla", "amphista"])
def test_concurrent_greedy_requests_equal_the_same_requests_one_by_one(target, make):
    app = create_app(make(target), api_key=KEY, max_batch_size=8)
    reqs = requests(8)
    with Server(app) as url:
        alone = [send(url, path, body) for path, body in reqs]
        together = concurrently(app, url, reqs)
        assert max(app.state.server.decoder.target.widths) == 8  # they did share forwards
        assert together == alone
        for (text, reason, tokens), (_, body) in zip(alone, reqs):
            assert (text, reason) == reference(target, body), body
            if reason == "length":  # each row ran to its own max_tokens
                assert tokens in (-1, body["max_tokens"])
        wait_for(lambda: metric(url, "amphista_rows_in_flight") == 0, "rows stayed in flight")
        assert metric(url, "amphista_active_generations") == 0
        assert app.state.server.worker.alive() and len(app.state.server.worker.engine) == 0
        assert app.state.server.worker.engine.ragged is False  # a finished row's slot takes the next request


@pytest.mark.parametrize("make", [vanilla, speculative], ids=["vanilla", "amphista"])
def test_more_requests_than_rows_wait_and_join_as_rows_leave(target, make):
    app = create_app(make(target), api_key=KEY, max_batch_size=3)
    reqs = requests(7)
    with Server(app) as url:
        together = concurrently(app, url, reqs)
        assert max(app.state.server.decoder.target.widths) == 3
        assert [(text, reason) for text, reason, _ in together] == [reference(target, b) for _, b in reqs]
        assert metric(url, "amphista_queue_depth") == 0


def test_stop_strings_end_their_own_row(target):
    app = create_app(vanilla(target), api_key=KEY, max_batch_size=4)
    reqs = []
    for i, p in enumerate(PROMPTS[:4]):
        full, _ = reference(target, {"prompt": p, "max_tokens": 24})
        stop = full.split()[2 + i]  # a word each greedy text contains, at a different place in each
        body = {"model": MODEL, "prompt": p, "max_tokens": 24, "temperature": 0, "stop": [stop, "zzz"]}
        reqs.append(("/v1/completions", {**body, "stream": i % 2 == 0}))
    with Server(app) as url:
        together = concurrently(app, url, reqs)
    for (text, reason, _), (_, body) in zip(together, reqs):
        assert (text, reason) == reference(target, body) and reason == "stop", body


def test_clients_that_hang_up_mid_generation_free_their_rows(target):
    decoder = vanilla(target)
    decoder.target.delay = 0.005  # ~5 ms a forward: a 480-token story outlasts a client that hangs up
    app = create_app(decoder, api_key=KEY, max_batch_size=4)
    cancelled = 'amphista_generations_total{reason="cancelled"}'
    long = {"model": MODEL, "prompt": "Once", "max_tokens": 480, "temperature": 0, "stream": True}
    short = [{**body, "max_tokens": 40, "stream": False} for _, body in requests(6)[::2]]
    tok = target.tokenizer
    prompts = sum(len(encode(tok, b["prompt"])) for b in short) + 2 * len(encode(tok, "Once"))
    with Server(app) as url, ThreadPoolExecutor(3) as pool:
        others = [pool.submit(send, url, "/v1/completions", body) for body in short]
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=long) as r:
                next(r.iter_lines())  # the first event arrived: its row is decoding; now hang up
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:  # a non-streaming client that hangs up
            raw = json.dumps({**long, "stream": False}).encode()
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw
            )
            # Every request has been admitted (prefilled) once all prompts are counted.
            wait_for(lambda: app.state.server.metrics.prompt_tokens == prompts, "the request never started")
        wait_for(lambda: metric(url, cancelled) == 2, "the hung-up requests were not cancelled")
        results = [f.result() for f in others]
        for (text, reason, _), body in zip(results, short):
            assert (text, reason) == reference(target, body)
        wait_for(lambda: metric(url, "amphista_rows_in_flight") == 0, "rows stayed in flight")
        assert len(app.state.server.worker.engine) == 0 and metric(url, "amphista_active_generations") == 0
        # The two hung-up requests together: fewer tokens than one uninterrupted "Once" story (345, then EOS).
        hung_up = metric(url, "amphista_generated_tokens_total") - sum(tokens for _, _, tokens in results)
        assert hung_up < 345


def test_a_failing_prefill_fails_its_request_alone_and_a_failing_step_fails_the_batch(target):
    decoder = vanilla(target)
    probe = decoder.target
    # A prefill holding token 499 breaks; joining requests are prefilled together, then one at a time when
    # that fails, so only the request with 499 may fail.
    probe.fail = lambda tokens: tokens.shape[1] > 1 and bool((tokens == 499).any())
    app = create_app(decoder, max_batch_size=4, max_queue=2)
    good = [{"model": MODEL, "prompt": p, "max_tokens": 6, "temperature": 0} for p in PROMPTS[:2]]
    with Server(app) as url, ThreadPoolExecutor(4) as pool:
        post = lambda b: httpx.post(url + "/v1/completions", json=b, timeout=60)  # noqa: E731
        probe.gate.clear()
        futures = [pool.submit(post, good[0])]
        wait_for(lambda: app.state.server.metrics.active == 1, "the first request never started")
        futures += [pool.submit(post, {**good[0], "prompt": [1, 499]}), pool.submit(post, good[1])]
        wait_for(lambda: app.state.server.worker.depth == 2, "the requests never reached the queue")
        full = post({**good[0], "prompt": "x"})
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
        assert full.headers["Retry-After"] == "1"  # no generation has finished yet: no estimate
        probe.gate.set()
        first, bad, second = (f.result() for f in futures)
        assert bad.status_code == 500 and "the target broke" in bad.json()["error"]["message"]
        for r, body in ((first, good[0]), (second, good[1])):
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference(target, body)[0]

        # A step (a forward of every live row) that fails fails each of its rows; the worker goes on.
        probe.gate.clear()
        futures = [pool.submit(post, good[0])]
        wait_for(lambda: app.state.server.metrics.active == 1, "the first request never started")
        futures.append(pool.submit(post, {**good[1], "stream": True}))
        wait_for(lambda: app.state.server.worker.depth == 1, "the request never reached the queue")
        probe.fail = lambda tokens: tokens.shape[0] == 2
        probe.gate.set()
        failed, failed_stream = (f.result() for f in futures)
        assert failed.status_code == 500 and "the target broke" in failed.json()["error"]["message"]
        events = [ln[6:] for ln in failed_stream.text.splitlines() if ln.startswith("data: ")]
        assert "the target broke" in json.loads(events[0])["error"]["message"] and events[-1] == "[DONE]"
        probe.fail = lambda tokens: False
        again = post(good[1])
        assert (
            again.status_code == 200 and again.json()["choices"][0]["text"] == reference(target, good[1])[0]
        )
        assert httpx.get(url + "/health").status_code == 200
        assert metric(url, 'amphista_generations_total{reason="error"}') == 3


def test_metrics_show_the_batch(target):
    app = create_app(vanilla(target), api_key=KEY, max_batch_size=4)
    with Server(app) as url:
        concurrently(app, url, requests(4))
        wait_for(lambda: metric(url, "amphista_rows_in_flight") == 0, "rows stayed in flight")
        text = httpx.get(url + "/metrics", headers=AUTH).text
    for line in (
        "amphista_max_batch_size 4",
        "amphista_rows_in_flight 0",
        "amphista_queue_depth 0",
        "# TYPE amphista_batch_tokens_per_second gauge",
        "# TYPE amphista_rows_in_flight gauge",
    ):
        assert line in text.splitlines(), line
    assert "(0 or 1)" not in text
    assert float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("amphista_batch_tok"))) > 0


def test_batch_size_one_keeps_decoding_one_request_at_a_time(target):
    app = create_app(vanilla(target), api_key=KEY, max_batch_size=1)
    reqs = requests(4)
    with Server(app) as url:
        together = concurrently(app, url, reqs)
        assert set(app.state.server.decoder.target.widths) == {1}
        assert app.state.server.worker.engine is None and metric(url, "amphista_max_batch_size") == 1
        assert metric(url, "amphista_batch_tokens_per_second") > 0
    assert [(text, reason) for text, reason, _ in together] == [reference(target, b) for _, b in reqs]


def test_max_batch_size_is_checked(target):
    assert build_parser().parse_args(["serve"]).max_batch_size == 8
    assert build_parser().parse_args(["serve", "--max-batch-size", "1"]).max_batch_size == 1
    for bad in ("0", "-3", "two", "1.5"):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["serve", "--max-batch-size", bad])
        assert e.value.code == 2
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(amphista.InputError, match="max_batch_size must be an integer >= 1"):
            create_app(amphista.VanillaDecoder(target), max_batch_size=bad)


def test_a_drafter_without_batched_decoding_serves_one_request_at_a_time(target, caplog):
    path = amphista.bundled.default_drafter_path("amphista")
    drafter = amphista.drafters.load_drafter(path, target)
    drafter.supports_rows = False  # as a user's drafter that implements only the one-sequence interface
    with caplog.at_level("WARNING", logger="amphista.serve"):
        app = create_app(
            amphista.SpeculativeDecoder(target, drafter, resolve_tree(None, path)), max_batch_size=8
        )
    assert app.state.server.worker.max_batch_size == 1 and app.state.server.metrics.max_batch_size == 1
    assert "batched decoding is off" in caplog.text
