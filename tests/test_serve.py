"""The OpenAI-compatible server over real HTTP on loopback.

Exact text, concurrency, bad input, auth, cancellation, errors."""

from __future__ import annotations

import gc
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

import amphista
from amphista.serve import create_app
from amphista.serve.app import MAX_RETRY_AFTER, retry_after
from amphista.serve.chat import PLAIN_STOP, chat_prompt, encode
from amphista.serve.loading import resolve_tree
from amphista.serve.metrics import Metrics
from amphista.serve.protocol import MAX_JSON_DEPTH
from amphista.serve.textstream import continuation_text
from amphista.serve.worker import Job

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went", "She saw a big"]
QUESTIONS = ["Hello!", "Tell me a story about a cat."]
N = 12  # reference length; requests ask for up to N tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, seconds: float = 60) -> None:
    """A bound on a wait for something that happens or never does, not a speed check."""
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.01)


class Server:
    """uvicorn in a thread on a free loopback port; `with Server(app) as base_url:`."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started, "the test server did not start"
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def target():
    return amphista.load_default_target()


@pytest.fixture(scope="module")
def refs(target):
    """Vanilla greedy token ids (N new tokens) for every completion prompt and chat question."""
    tok, vanilla = target.tokenizer, amphista.VanillaDecoder(target)
    out = {}
    for p in PROMPTS:
        ids = encode(tok, p)
        out[p] = (ids, vanilla.generate(ids, max_new_tokens=N, temperature=0).new_tokens)
    for q in QUESTIONS:
        ids = chat_prompt(tok, [{"role": "user", "content": q}]).ids
        out[q] = (
            ids,
            vanilla.generate(ids, max_new_tokens=N, temperature=0, stop_strings=[PLAIN_STOP]).new_tokens,
        )
    return out


def expected(tok, refs, key, n=N, chat=False):
    """The reference text of the first n tokens, computed from a full decode rather than a stream."""
    prompt, new = refs[key]
    text = continuation_text(tok, prompt, new[:n])
    return text.lstrip().split(PLAIN_STOP)[0] if chat else text


@pytest.fixture(scope="module")
def server(target):
    path = amphista.bundled.default_drafter_path("amphista")
    drafter = amphista.drafters.load_drafter(path, target)
    app = create_app(amphista.SpeculativeDecoder(target, drafter, resolve_tree(None, path)), api_key=KEY)
    with Server(app) as url:
        yield url, app


def client(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, **kw)


def test_openai_client_completion_and_chat_equal_vanilla_greedy(server, refs, target):
    url, app = server
    tok, c = target.tokenizer, client(url)
    model = c.models.list().data[0].id
    assert model == app.state.server.name == "stories260K"
    assert c.models.retrieve(model).id == model
    p = PROMPTS[0]
    r = c.completions.create(model=model, prompt=p, max_tokens=N, temperature=0)
    assert r.choices[0].text == expected(tok, refs, p)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(refs[p][0]), N)
    chunks = list(c.completions.create(model=model, prompt=p, max_tokens=N, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == expected(tok, refs, p)
    assert chunks[-1].choices[0].finish_reason == "length"

    q = QUESTIONS[1]
    msgs = [{"role": "user", "content": q}]
    r = c.chat.completions.create(model=model, messages=msgs, max_tokens=N, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected(tok, refs, q, chat=True)
    chunks = list(
        c.chat.completions.create(
            model=model,
            messages=msgs,
            max_tokens=N,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        == r.choices[0].message.content
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_stop_sequences_are_cut_like_openai(server, refs, target):
    url, _ = server
    c, p = client(url), PROMPTS[0]
    full = expected(target.tokenizer, refs, p)
    stop = full.split()[3]  # a word the greedy text contains
    for stream in (False, True):
        r = c.completions.create(
            model="stories260K", prompt=p, max_tokens=N, temperature=0, stop=[stop, "zzz"], stream=stream
        )
        chunks = list(r) if stream else [r]
        assert "".join(ch.choices[0].text for ch in chunks) == full[: full.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(server):
    c = client(server[0])
    texts = {
        c.completions.create(model="stories260K", prompt="Once", max_tokens=10, temperature=1.0, seed=123)
        .choices[0]
        .text
        for _ in range(2)
    }
    assert len(texts) == 1


def _body(**kw):
    return json.dumps({"model": "stories260K", "prompt": "Once", "max_tokens": 4, **kw}).encode()


def _chat(messages):
    return json.dumps({"model": "stories260K", "messages": messages}).encode()


def _chat_with(**kw):
    return json.dumps(
        {"model": "stories260K", "messages": [{"role": "user", "content": "Hi"}], **kw}
    ).encode()


IMAGE = [{"type": "image_url", "image_url": {"url": "http://x"}}]
DEEP = b"[" * 2000 + b"]" * 2000  # Python's json recursion limit is about 1,000 levels
BAD = [  # (path, body, status, param or code)
    ("/v1/completions", b"{not json", 400, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, "invalid_json"),
    ("/v1/completions", b"\xff\xfe", 400, "invalid_json"),
    ("/v1/completions", json.dumps({"model": "stories260K"}).encode(), 422, "prompt"),
    ("/v1/chat/completions", json.dumps({"model": "stories260K"}).encode(), 422, "messages"),
    ("/v1/completions", _body(temperature="hot"), 422, "temperature"),
    ("/v1/completions", _body(max_tokens=4.5), 422, "max_tokens"),
    ("/v1/completions", _body(stream="yes"), 422, "stream"),
    ("/v1/completions", _body(temperature=2.5), 422, "temperature"),
    ("/v1/completions", _body(top_p=0), 422, "top_p"),
    ("/v1/completions", _body(max_tokens=0), 422, "max_tokens"),
    ("/v1/completions", _body(max_tokens=10**6), 400, "max_tokens"),
    ("/v1/completions", _body(n=2), 400, "n"),
    ("/v1/completions", _body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("/v1/completions", _body(stop=""), 400, "stop"),
    ("/v1/completions", _body(logprobs=3), 400, "logprobs"),
    ("/v1/completions", _body(prompt=["a", "b"]), 400, "prompt"),
    ("/v1/completions", _body(prompt=[1, 99999]), 400, "prompt"),
    ("/v1/completions", _body(prompt=[]), 400, "prompt"),
    ("/v1/completions", _body(prompt="Once upon a time " * 200), 400, "context_length_exceeded"),
    ("/v1/completions", _body(model="gpt-4"), 404, "model_not_found"),
    ("/v1/completions", b'{"model": "stories260K", "prompt": "' + b"a" * (2 << 20) + b'"}', 413, None),
    ("/v1/chat/completions", _chat([]), 422, "messages"),
    ("/v1/chat/completions", _chat("hi"), 422, "messages"),
    ("/v1/chat/completions", _chat([{"role": "robot", "content": "x"}]), 400, "messages"),
    ("/v1/chat/completions", _chat([{"role": "user", "content": IMAGE}]), 400, "messages[0].content"),
    ("/v1/completions", b'{"model": "stories260K", "prompt": ' + DEEP + b"}", 400, "invalid_json"),
    ("/v1/chat/completions", b'{"frobnicate": ' + DEEP + b"}", 400, "invalid_json"),
    ("/v1/completions", DEEP, 400, "invalid_json"),
    ("/v1/completions", _body(frobnicate=1), 400, "frobnicate"),
    ("/v1/completions", _body(best_of=2), 400, "best_of"),
    ("/v1/completions", _body(response_format={"type": "json_object"}), 400, "response_format"),
    ("/v1/chat/completions", _chat_with(response_format={"type": "json_object"}), 400, "response_format"),
    ("/v1/chat/completions", _chat_with(frobnicate=True), 400, "frobnicate"),
    ("/v1/chat/completions", _chat_with(best_of=2), 400, "best_of"),  # a completions-only field
    ("/v1/chat/completions", _chat_with(tools=[{"type": "function"}]), 400, "tools"),
]


def test_bad_input_gets_its_status_and_an_openai_error_body(server):
    url, _ = server
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
        for path, body, status, what in BAD:
            r = http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (body[:80], r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            if what is not None:
                assert what in (err["param"], err["code"]), (body[:80], err)
        assert http.get("/v1/nothing").status_code == 404
        assert http.get("/v1/completions").json()["error"]["message"]  # 405, still an OpenAI body
        assert http.get("/health").json()["status"] == "ok"
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="nope", prompt="x", max_tokens=2)


def test_unknown_fields_are_named_and_fields_that_ask_for_nothing_pass(server):
    url, _ = server
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
        err = http.post("/v1/completions", content=_body(frobnicate=1, zzz=2)).json()["error"]
        assert "unknown fields frobnicate, zzz" in err["message"] and err["code"] == "unknown_field"
        assert "Supported fields: echo, frequency_penalty, max_tokens, model," in err["message"]
        err = http.post("/v1/completions", content=_body(best_of=3, logprobs=0)).json()["error"]
        assert "best_of, logprobs are not supported" in err["message"] and err["code"] == "unsupported_field"
        err = http.post("/v1/chat/completions", content=_chat_with(response_format={"type": "json_object"}))
        assert "response_format is not supported" in err.json()["error"]["message"]
        assert "messages" in err.json()["error"]["message"]  # the supported list is the chat endpoint's
        # The values that ask for nothing, as some clients send them whatever the caller asked.
        off = dict(n=1, logprobs=None, best_of=1, logit_bias={}, suffix=None, user="u", frequency_penalty=0.0)
        assert http.post("/v1/completions", content=_body(**off)).status_code == 200
        off = dict(
            n=1,
            logprobs=False,
            top_logprobs=0,
            tools=[],
            tool_choice="none",
            parallel_tool_calls=True,
            response_format={"type": "text"},
            store=False,
            metadata={"team": "a"},
            safety_identifier="h",
            max_tokens=2,
        )
        assert http.post("/v1/chat/completions", content=_chat_with(**off)).status_code == 200
        # Brackets inside strings are text, not nesting.
        r = http.post("/v1/completions", content=_body(prompt="[" * (MAX_JSON_DEPTH + 10), max_tokens=2))
        assert r.status_code == 200, r.text
        nested = json.loads(_chat_with())
        nested["messages"][0]["content"] = [{"type": "text", "text": "Hi"}]  # deepest legitimate shape
        assert http.post("/v1/chat/completions", json={**nested, "max_tokens": 2}).status_code == 200


def test_api_key_on_every_endpoint_but_health(server):
    url, _ = server
    for scheme in ("Bearer", "bearer", "BEARER", "Bearer "):  # RFC 7235: the scheme is case-insensitive
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    wrong = ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"})
    for headers in wrong + ({"Authorization": f"Bearer{KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
        for path in ("/v1/models", "/metrics", "/v1/completions", "/v1/chat/completions", "/nowhere"):
            r = httpx.request(
                "GET" if "com" not in path else "POST", url + path, headers=headers, content=_body()
            )
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def _one(url, i, target, refs):
    """Client i of a round: alternates chat / completion, streaming / not, and lengths."""
    chat, stream, n = i % 2 == 0, i % 4 < 2, 2 + i % 7
    key = QUESTIONS[i % len(QUESTIONS)] if chat else PROMPTS[i % len(PROMPTS)]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": "stories260K", "max_tokens": n, "temperature": 0, "stream": stream}
    body.update({"messages": [{"role": "user", "content": key}]} if chat else {"prompt": key})
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as http:
        if not stream:
            choice = http.post(path, json=body).json()["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
        else:
            with http.stream("POST", path, json=body) as r:
                events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
            assert events[-1] == "[DONE]"
            choices = [json.loads(e)["choices"][0] for e in events[:-1]]
            text = "".join(c["delta"].get("content", "") if chat else c["text"] for c in choices)
    assert text == expected(target.tokenizer, refs, key, n, chat), (i, chat, stream, n)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


POOL_THREAD = "AnyIO worker thread"


def test_32_concurrent_clients_mixed_streaming(server, refs, target):
    url, app = server
    threads, rss = [], []
    for _round in range(3):
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda i: _one(url, i, target, refs), range(32)))
        gc.collect()
        threads.append(sum(t.name != POOL_THREAD for t in threading.enumerate()))
        rss.append(_rss_mb())
    assert threads[0] == threads[-1], threads
    # Request preparation runs in anyio's pool, which keeps idle threads and grows with the overlap of
    # requests, up to its limit; any other new thread would be a leak.
    assert sum(t.name == POOL_THREAD for t in threading.enumerate()) <= 40
    assert rss[-1] - rss[0] < 25, rss
    assert not [o for o in gc.get_objects() if type(o) is Job]
    assert app.state.server.worker.depth == 0 and app.state.server.worker.alive()
    assert httpx.get(url + "/health").json() == {"status": "ok", "queue_depth": 0}
    metrics = httpx.get(url + "/metrics", headers=AUTH).text
    for name in (
        "requests_total",
        "generated_tokens_total",
        "tokens_per_second",
        "accept_length_bucket",
        "queue_depth",
    ):
        assert f"amphista_{name}" in metrics
    assert 'amphista_requests_total{endpoint="/v1/completions",code="200"}' in metrics
    # Drafts were accepted: some forwards committed several tokens. (How many depends on the trees tree="auto"
    # picks for the rows in flight, plain decoding among them, so no fixed tau is promised here.)
    forwards = _metric(url, "amphista_accept_length_count")
    assert _metric(url, "amphista_accept_length_sum") > forwards > _metric(url, 'amphista_accept_length_bucket{le="1"}')


def _metric(url, line_start) -> float:
    text = httpx.get(url + "/metrics", headers=AUTH).text
    return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith(line_start)))


class SlowDecoder(amphista.VanillaDecoder):
    """Plain decoding slowed to ~5 ms a token, so that a generation outlasts a client that hangs up whatever
    the speed of the machine (the bundled model alone can finish 480 tokens in well under a second)."""

    def _run(self, request):
        gen = super()._run(request)
        try:
            while True:
                time.sleep(0.005)
                yield next(gen)
        except StopIteration as done:
            return done.value


def test_disconnected_clients_free_their_slot(target):
    # One request at a time (decoder.stream): SlowDecoder slows that path; batching has its own test.
    with Server(create_app(SlowDecoder(target), api_key=KEY, max_batch_size=1)) as url:
        _hang_up_twice(url)


def _hang_up_twice(url):
    """A streaming client and a non-streaming one hang up mid-generation: both are cancelled."""
    cancelled = 'amphista_generations_total{reason="cancelled"}'
    before, tokens_before = _metric(url, cancelled), _metric(url, "amphista_generated_tokens_total")
    body = {"model": "stories260K", "prompt": "Once", "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            next(r.iter_lines())  # the first event arrived: generation is running; now hang up
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:  # non-streaming, hangs up
        raw = json.dumps({**body, "stream": False}).encode()
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw
        )
        time.sleep(0.3)
    deadline = time.time() + 20
    while _metric(url, cancelled) < before + 2 and time.time() < deadline:
        time.sleep(0.1)
    assert _metric(url, cancelled) == before + 2
    # Together fewer tokens than the one uninterrupted story (345 tokens, then EOS) would have had.
    assert _metric(url, "amphista_generated_tokens_total") - tokens_before < 345
    assert _metric(url, "amphista_active_generations") == 0


class GatedDecoder(amphista.VanillaDecoder):
    """Waits on `gate` before decoding; a prompt ending in token 499 raises mid-generation."""

    def __init__(self, target):
        super().__init__(target)
        self.gate = threading.Event()

    def _run(self, request):
        self.gate.wait(30)
        if request.prompt[-1] == 499:
            raise RuntimeError("the decoder broke")
        return (yield from super()._run(request))


def test_errors_stay_with_their_request_and_a_full_queue_says_503(target, refs):
    decoder = GatedDecoder(target)
    app = create_app(decoder, max_queue=2, max_batch_size=1)  # the one-at-a-time path: GatedDecoder gates it
    body = {"model": "stories260K", "max_tokens": 6, "temperature": 0}
    with Server(app) as url, ThreadPoolExecutor(4) as pool:
        post = lambda b: httpx.post(url + "/v1/completions", json={**body, **b}, timeout=60)  # noqa: E731
        good = pool.submit(post, {"prompt": PROMPTS[1]})
        while app.state.server.metrics.active == 0:  # the worker holds the first request at the gate
            time.sleep(0.01)
        bad = pool.submit(post, {"prompt": [1, 499]})
        bad_stream = pool.submit(post, {"prompt": [1, 499], "stream": True})
        while app.state.server.worker.depth < 2:
            time.sleep(0.01)
        full = post({"prompt": "x"})
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
        assert full.headers["Retry-After"] == "1"  # no generation has finished yet: no estimate
        decoder.gate.set()
        assert good.result().json()["choices"][0]["text"] == expected(target.tokenizer, refs, PROMPTS[1], 6)
        assert bad.result().status_code == 500 and "decoder broke" in bad.result().json()["error"]["message"]
        events = [ln[6:] for ln in bad_stream.result().text.splitlines() if ln.startswith("data: ")]
        assert "decoder broke" in json.loads(events[0])["error"]["message"] and events[-1] == "[DONE]"
        assert (
            post({"prompt": PROMPTS[1]}).json()["choices"][0]["text"]
            == good.result().json()["choices"][0]["text"]
        )
        assert httpx.get(url + "/health").status_code == 200


def test_retry_after_is_about_one_recent_generation():
    metrics = Metrics(1)
    assert retry_after(metrics) == 1
    for seconds in (2.0, 3.0):
        metrics.finish("length", 10, seconds)
    assert retry_after(metrics) == 3  # 2.5 s, rounded up
    metrics.finish("length", 10, 10_000.0)
    assert retry_after(metrics) == MAX_RETRY_AFTER
    batched = Metrics(1, max_batch_size=8)  # a full queue means a full batch: a row ends 8 times as often
    for seconds in (20.0, 30.0):
        batched.finish("length", 10, seconds)
    assert retry_after(batched) == 4  # 25 s / 8, rounded up


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_a_client_that_leaves_while_uploading_is_no_server_error(server):
    url, _ = server
    records, ours = Records(), logging.getLogger("amphista.serve")
    loggers = [logging.getLogger(n) for n in ("uvicorn", "")]  # uvicorn's loggers do not propagate to root
    for lg in loggers:
        lg.addHandler(records)
    level, _ = ours.level, ours.setLevel(logging.INFO)
    try:
        left = 'amphista_requests_total{endpoint="/v1/completions",code="499"}'
        before = _metric_or_zero(url, left)
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100000\r\n\r\n"
                b'{"model": "stories260K", "prompt": "Once'
            )
        deadline = time.time() + 30  # a bound on the wait, not on the speed: the count arrives or never does
        while _metric_or_zero(url, left) == before and time.time() < deadline:
            time.sleep(0.05)
        assert _metric_or_zero(url, left) == before + 1
        assert 'endpoint="/v1/completions",code="500"' not in httpx.get(url + "/metrics", headers=AUTH).text
    finally:
        ours.setLevel(level)
        for lg in loggers:
            lg.removeHandler(records)
    assert not [r for r in records.records if r.exc_info or r.levelno >= logging.WARNING], records.records
    assert ["disconnected" in r.getMessage() for r in records.records if r.name == ours.name] == [True]


def _metric_or_zero(url, line_start) -> float:
    text = httpx.get(url + "/metrics", headers=AUTH).text
    return next((float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(line_start)), 0.0)


class BlockingTokenizer:
    """The model's tokenizer, except that encoding a text containing "BLOCK" waits for `release`."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.entered, self.release, self.returned = threading.Event(), threading.Event(), threading.Event()

    def __call__(self, text, *args, **kwargs):
        if "BLOCK" in text:
            self.entered.set()
            self.release.wait(30)
            self.returned.set()
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_tokenizing_does_not_block_other_clients(target):
    tok = BlockingTokenizer(target.tokenizer)
    app = create_app(amphista.VanillaDecoder(target, tokenizer=tok))
    requests = [
        ("/v1/completions", {"prompt": "BLOCK Once upon a time"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "BLOCK Hello"}]}),
    ]
    with Server(app) as url, ThreadPoolExecutor(1) as pool:
        for path, body in requests:
            tok.entered.clear(), tok.release.clear(), tok.returned.clear()
            body = {"model": "stories260K", "max_tokens": 2, **body}
            pending = pool.submit(httpx.post, url + path, json=body, timeout=120)
            assert tok.entered.wait(60), "the request never reached the tokenizer"
            assert httpx.get(url + "/health", timeout=120).json()["status"] == "ok"
            # Ordering, not speed: /health answered while the tokenizer still held the other request.
            assert not tok.returned.is_set(), path
            tok.release.set()
            assert pending.result().status_code == 200, pending.result().text


# -- the command's process: decoding on its main thread, shutting down --------------------------------------

SERVE_SCRIPT = """
import sys, threading
import amphista.batch as batch
step = batch.BatchEngine.step
def traced(self):
    if not getattr(traced, "said", False):
        traced.said = True
        print("decoding on", threading.current_thread().name, file=sys.stderr, flush=True)
    return step(self)
batch.BatchEngine.step = traced
from amphista.cli import main
sys.exit(main(["serve", "--port", sys.argv[1], "--drafter", "none", "--log-level", "warning"]))
"""


def _serve_process(port: int):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(port)], stderr=subprocess.PIPE, text=True)


def test_the_command_decodes_on_its_main_thread_and_sigterm_stops_it_gracefully():
    """Decoding on the thread that loaded the model (see Worker.run); SIGTERM ends the process with 0."""
    import signal

    port = free_port()
    proc = _serve_process(port)
    try:
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(lambda: proc.poll() is not None or answers(), "the server did not answer /health", 120)
        assert httpx.get(url + "/health", timeout=2).json()["status"] == "ok"
        body = {"model": "stories260K", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert "decoding on MainThread" in err and "Traceback" not in err, err


def test_the_command_exits_1_when_its_port_is_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = _serve_process(taken.getsockname()[1])
        try:
            assert proc.wait(120) == 1  # not a process left decoding nothing
        finally:
            proc.kill()
    err = proc.stderr.read()
    assert "address already in use" in err.lower() and "Traceback" not in err, err
