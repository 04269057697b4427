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
        ["--drafter", "medusa", "--tree", "chain", "--tree-shape", "dynamic"],
        ["--tree-shape", "static"],
        ["--drafter", drafter_dir, "--stats"],
        ["--drafter", "none", "--no-stream"],
    ):
        assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "24", *extra]) == 0
        out = capsys.readouterr()
        assert out.out == want, extra
        if "--stats" in extra:
            assert "tokens/s" in out.err and "tau" in out.err


def test_tree_shape_reaches_the_decoder(monkeypatch):
    from amphista.serve import loading

    made = []
    real = loading.SpeculativeDecoder

    def spy(*args, **kwargs):
        made.append(kwargs.get("dynamic"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "SpeculativeDecoder", spy)
    for shape, want in (("default", None), ("static", False), ("dynamic", True)):
        decoder = loading.load_decoder(None, "medusa", "chain", tree_shape=shape)
        assert made[-1] is want and decoder.dynamic_trees is bool(want)


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


def test_chat_with_a_prompt_answers_that_one_message(target, monkeypatch, capsys):
    message = "Hello!\nTell me a story."  # one message, its newline included
    ids = chat_prompt(target.tokenizer, [{"role": "user", "content": message}]).ids
    want = _vanilla_text(target, ids, 12, [PLAIN_STOP]).lstrip().split(PLAIN_STOP)[0]
    _stdin(monkeypatch, b"never read\n")
    args = ["generate", "--chat", "--prompt", message, "--drafter", "none", "--max-new-tokens", "12"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out == want + "\n" and "chat template" not in err
    assert main(["generate", "--chat", "--prompt", "  ", "--drafter", "none"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--prompt is empty: with --chat it is the message to answer" in err


def test_a_completion_on_a_chat_model_says_how_to_get_an_answer(monkeypatch, capsys):
    from amphista.serve import terminal

    assert main(["generate", "--prompt", PROMPT, "--drafter", "none", "--max-new-tokens", "4"]) == 0
    assert "add --chat" not in capsys.readouterr().err  # the bundled model has no chat template
    monkeypatch.setattr(terminal, "has_chat_template", lambda tokenizer: True)
    assert main(["generate", "--prompt", PROMPT, "--drafter", "none", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(PROMPT) and "this model has a chat template" in err and "add --chat" in err


def test_generate_errors_name_the_fix(capsys):
    with pytest.raises(SystemExit) as exit:  # argparse checks the value while parsing
        main(["generate", "--prompt", "x", "--max-new-tokens", "0"])
    assert exit.value.code == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--drafter", "/no/such/drafter"]) == 2
    assert "/no/such/drafter" in capsys.readouterr().err


def _stdin(monkeypatch, data: bytes, tty: bool = False):
    class Stdin(io.TextIOWrapper):
        def isatty(self):
            return tty

    monkeypatch.setattr(sys, "stdin", Stdin(io.BytesIO(data)))


def test_prompt_from_stdin_loses_exactly_one_trailing_newline(target, monkeypatch, capsys):
    for prompt in (PROMPT, PROMPT + "\n"):
        assert main(["generate", "--drafter", "none", "--prompt", prompt, "--max-new-tokens", "8"]) == 0
        want = capsys.readouterr().out
        _stdin(monkeypatch, prompt.encode() + b"\n")  # what `echo "$prompt" |` sends
        assert main(["generate", "--drafter", "none", "--max-new-tokens", "8"]) == 0
        assert capsys.readouterr().out == want
    _stdin(monkeypatch, PROMPT.encode())  # no newline at all: nothing to strip
    assert main(["generate", "--drafter", "none", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith(
        PROMPT + _vanilla_text(target, encode(target.tokenizer, PROMPT), 8)
    )


def test_a_refused_prompt_prints_only_the_error(capsys):
    code = main(["generate", "--drafter", "none", "--prompt", "word " * 600])  # longer than the context
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("amphista generate: error: ")]
    assert len(errors) == 1 and "context window" in errors[0] and "Traceback" not in err


def test_system_prompt_needs_chat_and_is_used_by_it(target, monkeypatch, capsys):
    assert main(["generate", "--prompt", PROMPT, "--system", "Be brief."]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--system needs --chat" in err
    system = "You tell stories about a dog named Rex."
    ids = chat_prompt(
        target.tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
    ).ids
    want = _vanilla_text(target, ids, 10, [PLAIN_STOP]).lstrip().split(PLAIN_STOP)[0]
    _stdin(monkeypatch, b"Hi\n")
    assert (
        main(["generate", "--chat", "--system", system, "--drafter", "none", "--max-new-tokens", "10"]) == 0
    )
    assert capsys.readouterr().out == f"Assistant: {want}\n"


LONG_TURNS = [
    "The little dog ran to the park and played with a red ball all day long. " * 4,
    "A girl named Sue found a big blue box under the old tree in the garden. " * 4,
    "The cat sat on the warm mat and looked at the birds that sang in the sun. " * 4,
    "Tom and his mom baked a cake with many sweet apples for the happy party. " * 4,
    "Tell me a story.",
]


def test_chat_that_outgrows_the_context_answers_in_a_fresh_conversation(target, monkeypatch, capsys):
    tok, n = target.tokenizer, 12

    def reply(messages):
        ids = chat_prompt(tok, messages).ids
        return _vanilla_text(target, ids, n, [PLAIN_STOP]).lstrip().split(PLAIN_STOP)[0]

    history, replies, fits = [], [], []
    for line in LONG_TURNS:
        turn = {"role": "user", "content": line}
        fits.append(len(chat_prompt(tok, history + [turn]).ids) + n <= target.max_context)
        if not fits[-1]:
            history = []
        replies.append(reply(history + [turn]))
        history += [turn, {"role": "assistant", "content": replies[-1]}]
    assert fits == [True, True, True, False, True]  # the fourth turn overflows, the fifth follows it
    _stdin(monkeypatch, "\n".join(LONG_TURNS).encode() + b"\n")
    assert main(["generate", "--chat", "--drafter", "none", "--max-new-tokens", str(n)]) == 0
    out, err = capsys.readouterr()
    assert out == "".join(f"Assistant: {r}\n" for r in replies)
    assert err.count("cleared") == 1


def test_chat_turn_too_long_for_the_context(monkeypatch, capsys):
    too_long = b"word " * 600
    _stdin(monkeypatch, b"Hello\n" + too_long + b"\nBye\n")  # a pipe: the chat ends with the error
    assert main(["generate", "--chat", "--drafter", "none", "--max-new-tokens", "4"]) == 2
    out, err = capsys.readouterr()
    assert out.count("Assistant: ") == 1
    assert "line 2" in err and "this message alone" in err and "context window is 512" in err
    _stdin(monkeypatch, b"Hello\n" + too_long + b"\nBye\n", tty=True)  # a terminal: refused, chat goes on
    assert main(["generate", "--chat", "--drafter", "none", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.count("Assistant: ") == 2 and "this message alone" in err


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


def test_generate_and_serve_take_the_drafters_shipped_for_the_target(monkeypatch, tmp_path, capsys):
    import shutil

    from amphista import bundled
    from amphista.serve.loading import load_drafter_arg

    target = bundled.load_default_target()
    drafter, path = load_drafter_arg(None, target, None)
    assert path == bundled.default_drafter_path("amphista") and drafter is not None

    # Another target's registry entry: its shipped drafters are the defaults, by kind.
    root = tmp_path / "shipped"
    for kind in ("amphista", "medusa"):
        shutil.copytree(bundled.default_drafter_path(kind), root / kind)
    monkeypatch.setitem(bundled.SHIPPED_DRAFTERS, "smollm2-135m-instruct", root)
    assert load_drafter_arg(None, target, "smollm2-135m-instruct")[1] == root / "amphista"
    assert load_drafter_arg("medusa", target, "smollm2-135m-instruct")[1] == root / "medusa"

    shutil.rmtree(root / "amphista")
    assert load_drafter_arg(None, target, "smollm2-135m-instruct") == (None, None)
    assert "not installed: vanilla decoding" in capsys.readouterr().err
    assert load_drafter_arg(None, target, str(tmp_path / "some-model")) == (None, None)
    assert "no drafters are shipped for this target" in capsys.readouterr().err


def test_a_drafter_name_is_not_shadowed_by_a_folder_that_holds_no_drafter(monkeypatch, tmp_path):
    """From a checkout's root, `--drafter amphista` is the shipped drafter, not the package folder."""
    import shutil

    from amphista import bundled
    from amphista.bench.questions import bundled_questions_path, questions_path
    from amphista.serve.loading import load_drafter_arg

    monkeypatch.chdir(tmp_path)
    (tmp_path / "amphista").mkdir()
    (tmp_path / "mt_bench").mkdir()
    shutil.copytree(bundled.default_drafter_path("medusa"), tmp_path / "medusa")
    target = bundled.load_default_target()
    assert load_drafter_arg("amphista", target)[1] == bundled.default_drafter_path("amphista")
    assert load_drafter_arg("medusa", target)[1] == tmp_path.joinpath("medusa").relative_to(tmp_path)
    assert questions_path("mt_bench") == bundled_questions_path("mt_bench")

    from amphista.bench.loading import parse_drafter_args

    shipped = {kind: str(bundled.default_drafter_path(kind)) for kind in ("amphista", "medusa")}
    assert parse_drafter_args(["amphista", "mine=medusa"]) == {"amphista": shipped["amphista"], "mine": "medusa"}
    chat = parse_drafter_args(["amphista"], "smollm2-135m-instruct")["amphista"]
    assert chat == str(bundled.default_drafter_path("amphista", "smollm2-135m-instruct")) != shipped["amphista"]
