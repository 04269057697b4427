"""Incremental detokenization, `amphista generate` (completion and chat) and the `amphista serve` command."""

from __future__ import annotations

import io
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

import amphista
from amphista.cli import main
from amphista.serve.chat import PLAIN_STOP, chat_prompt, encode
from amphista.serve.textstream import TextStream, continuation_text

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def target():
    return amphista.load_default_target()


def _stream(tok, prompt, new, stops=(), sizes=(1,), lstrip=False):
    """Push `new` in chunks of the given sizes (speculative steps commit several tokens at once)."""
    ts, pieces, i, k = TextStream(tok, prompt, stops, lstrip), [], 0, 0
    while i < len(new):
        n = sizes[k % len(sizes)]
        pieces.append(ts.push(new[i : i + n]))
        i, k = i + n, k + 1
    pieces.append(ts.finish())
    return pieces


def test_multibyte_characters_split_across_tokens_stream_whole(target):
    tok = target.tokenizer
    prompt = encode(tok, "She said:")
    new = tok("日本 héllo ☃ ok — fin.", add_special_tokens=False).input_ids
    assert (
        sum(tok.convert_ids_to_tokens(i).startswith("<0x") for i in new) >= 6
    )  # really byte-fallback tokens
    want = continuation_text(tok, prompt, new)
    assert "日本" in want and "☃" in want
    for sizes in ((1,), (2,), (3, 1, 5), (len(new),)):
        pieces = _stream(tok, prompt, new, sizes=sizes)
        assert "".join(pieces) == want
        assert not any("\ufffd" in p for p in pieces)
    assert "".join(_stream(tok, [], new)) == tok.decode(new, skip_special_tokens=True)  # no prompt at all


def test_stop_strings_are_held_back_then_cut(target):
    tok = target.tokenizer
    prompt = encode(tok, PROMPT)
    new = tok(" there was a girl.\nUser: hi\nAssistant: yes", add_special_tokens=False).input_ids
    full = continuation_text(tok, prompt, new)
    rng = random.Random(0)
    for _ in range(5):
        sizes = [rng.randint(1, 4) for _ in range(8)]
        pieces = _stream(tok, prompt, new, [PLAIN_STOP], sizes)
        assert "".join(pieces) == full.split(PLAIN_STOP)[0]
        assert not any("User" in p for p in pieces)
    assert (
        "".join(_stream(tok, prompt, new, ["zz"])) == full
    )  # a partial match that never completes is released
    assert "".join(_stream(tok, prompt, new, [], lstrip=True)) == full.lstrip()


def _vanilla_text(target, prompt_ids, n, stops=None):
    new = (
        amphista.VanillaDecoder(target)
        .generate(prompt_ids, max_new_tokens=n, temperature=0, stop_strings=stops)
        .new_tokens
    )
    return continuation_text(target.tokenizer, prompt_ids, new)


@pytest.fixture(scope="module")
def drafter_dir(target, tmp_path_factory):
    path = tmp_path_factory.mktemp("drafter") / "amphista"
    amphista.AmphistaDrafter.for_target(target).save_pretrained(path)  # untrained: lossless, not fast
    return str(path)


def test_generate_prints_the_vanilla_greedy_text(target, drafter_dir, capsys):
    want = PROMPT + _vanilla_text(target, encode(target.tokenizer, PROMPT), 24) + "\n"
    for extra in (
        ["--drafter", "none"],
        ["--stats"],  # the bundled Amphista drafter, tree built from its head accuracies
        ["--drafter", "medusa", "--tree", "chain"],
        ["--drafter", drafter_dir, "--stats"],
        ["--drafter", "none", "--no-stream"],
    ):
        assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "24", *extra]) == 0
        out = capsys.readouterr()
        assert out.out == want, extra
        if "--stats" in extra:
            assert "tokens/s" in out.err and "tau" in out.err


def test_chat_is_multi_turn_with_the_plain_template(target, monkeypatch, capsys):
    tok = target.tokenizer

    def reply(messages):
        ids = chat_prompt(tok, messages).ids
        return _vanilla_text(target, ids, 12, [PLAIN_STOP]).lstrip().split(PLAIN_STOP)[0]

    first = reply([{"role": "user", "content": "Hello!"}])
    history = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": first}]
    second = reply(history + [{"role": "user", "content": "Tell me a story."}])
    fresh = reply([{"role": "user", "content": "Tell me a story."}])
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello!\n\nTell me a story.\n/reset\nTell me a story.\n"))
    assert main(["generate", "--chat", "--drafter", "none", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == "".join(f"Assistant: {r}\n" for r in (first, second, fresh))


def test_generate_errors_name_the_fix(capsys):
    assert main(["generate", "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--drafter", "/no/such/drafter"]) == 2
    assert "/no/such/drafter" in capsys.readouterr().err


def test_serve_command_binds_loopback_and_reads_the_key_from_the_environment(target):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AMPHISTA_API_KEY": "env-key"}
    cmd = [
        sys.executable,
        "-m",
        "amphista.cli",
        "serve",
        "--drafter",
        "none",
        "--threads",
        "1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(
            url + "/v1/completions",
            headers={"Authorization": "Bearer env-key"},
            timeout=60,
            json={"model": "stories260K", "prompt": PROMPT, "max_tokens": 10, "temperature": 0},
        )
        assert r.json()["choices"][0]["text"] == _vanilla_text(target, encode(target.tokenizer, PROMPT), 10)
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out
    assert "127.0.0.1" in out
