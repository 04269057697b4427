"""What the command line does with bad input, Ctrl-C and a closed pipe: one line on stderr and a shell-style
exit status, never a traceback."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import amphista
from amphista import bundled
from amphista.bench.loading import target_shape
from amphista.cli import main
from amphista.target import TargetModel

ROOT = Path(__file__).resolve().parent.parent
BAD = b"Once upon a \xff\xfe time"  # 0xff at byte offset 12


def run(capsys, *argv):
    """amphista ARGV in this process -> (exit status, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse rejects a value while parsing
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, command: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("amphista ")]
    assert len(lines) == 1 and lines[0].startswith(f"amphista {command}: error: "), err
    return lines[0]


def amphista_cli(*argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "amphista.cli", *argv], capture_output=True, cwd=ROOT, **kwargs
    )


# -- text that is not UTF-8 ------------------------------------------------------------------------------


def test_non_utf8_stdin_names_the_byte_and_exits_2():
    proc = amphista_cli("generate", input=BAD)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and proc.stdout == b""
    line = one_line_error(err, "generate")
    assert "standard input" in line and "0xff" in line and "offset 12" in line and "line 1" in line


def test_non_utf8_prompt_argument_names_the_flag():
    # A shell hands `--prompt "$(cat bad.bin)"` over as raw bytes; Python turns them into surrogates.
    proc = subprocess.run(
        [sys.executable.encode(), b"-m", b"amphista.cli", b"generate", b"--prompt", BAD],
        capture_output=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and proc.stdout == b""
    line = one_line_error(proc.stderr.decode(), "generate")
    assert "--prompt" in line and "0xff" in line and "offset 12" in line


def test_non_utf8_chat_line_names_its_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hello\n" + BAD + b"\n")))
    code, out, err = run(capsys, "generate", "--chat", "--drafter", "none", "--max-new-tokens", "3")
    assert code == 2
    assert out.startswith("Assistant: ") and out.count("Assistant: ") == 1  # the first line was answered
    line = one_line_error(err, "generate")
    assert "line 2" in line and "offset 18" in line


# -- a --target that is not a model ----------------------------------------------------------------------


def _not_models(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (path, a phrase the error must contain)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "main.py").write_text("print()\n")
    (tmp_path / "untyped").mkdir()
    (tmp_path / "untyped" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (tmp_path / "file.txt").write_text("hi\n")
    return {
        "drafter": (str(bundled.default_drafter_path("amphista")), "--drafter"),
        "empty": (str(tmp_path / "empty"), "is empty"),
        "no config": (str(tmp_path / "code"), "no config.json"),
        "no model_type": (str(tmp_path / "untyped"), "model_type"),
        "file": (str(tmp_path / "file.txt"), "not a folder"),
        "missing": (str(tmp_path / "nowhere"), "does not exist"),
    }


def test_target_that_is_not_a_model_is_a_one_line_error(tmp_path, capsys):
    for name, (path, phrase) in _not_models(tmp_path).items():
        code, out, err = run(capsys, "generate", "--prompt", "x", "--target", path)
        assert code == 2 and out == "", name
        line = one_line_error(err, "generate")
        assert phrase in line, (name, line)
        if name != "drafter":  # the drafter's error says what to do with it instead
            assert "config.json" in line and "causal LM" in line, (name, line)
        with pytest.raises(amphista.InputError, match="causal LM|--drafter"):
            TargetModel.load(path)
        with pytest.raises(amphista.InputError, match="causal LM|--drafter"):
            target_shape(path)


def test_target_error_from_a_fresh_process():
    proc = amphista_cli("generate", "--prompt", "x", "--target", str(bundled.default_drafter_path("medusa")))
    assert proc.returncode == 2
    line = one_line_error(proc.stderr.decode(), "generate")
    assert "drafter" in line


# -- values checked while parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["serve", "--log-level", "bogus"], "--log-level"),
        (["serve", "--port", "99999"], "--port"),
        (["serve", "--port", "0"], "--port"),
        (["serve", "--port", "http"], "--port"),
        (["serve", "--max-tokens-limit", "0"], "--max-tokens-limit"),
        (["serve", "--max-queue", "-1"], "--max-queue"),
        (["serve", "--max-queue", "0"], "--max-queue"),  # every request would get a 503
        (["serve", "--max-body-bytes", "0"], "--max-body-bytes"),
        (["serve", "--threads", "0"], "--threads"),
        (["serve", "--tree-nodes", "1"], "--tree-nodes"),
        (["generate", "--tree-shape", "both"], "--tree-shape"),
        (["generate", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
        (["generate", "--prompt", "x", "--top-p", "0"], "--top-p"),
        (["generate", "--prompt", "x", "--top-k", "-1"], "--top-k"),
        (["generate", "--prompt", "x", "--temperature", "-0.5"], "--temperature"),
        (["generate", "--prompt", "x", "--temperature", "nan"], "--temperature"),
        (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "--prompt", "x", "--seed", "-1"], "--seed"),
        (["generate", "--prompt", "x", "--seed", str(2**70)], "--seed"),
        (["generate", "--prompt", "x", "--threads", "-2"], "--threads"),
        (["demo", "--runs", "0"], "--runs"),
        (["demo", "--prompts", "0"], "--prompts"),
        (["demo", "--max-new-tokens", "-5"], "--max-new-tokens"),
        (["demo", "--tree-nodes", "0"], "--tree-nodes"),
        (["demo", "--threads", "0"], "--threads"),
    ],
)
def test_bad_option_values_fail_while_parsing(argv, flag, capsys):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert f"error: argument {flag}" in err and "Traceback" not in err


def test_good_edge_values_parse():
    from amphista.cli import build_parser

    args = build_parser().parse_args(
        [
            "generate",
            "--top-p",
            "1",
            "--top-k",
            "0",
            "--temperature",
            "0",
            "--seed",
            "0",
            "--max-new-tokens",
            "1",
        ]
    )
    assert (args.top_p, args.top_k, args.temperature, args.seed, args.max_new_tokens) == (1.0, 0, 0.0, 0, 1)
    args = build_parser().parse_args(["serve", "--port", "65535", "--max-queue", "1", "--log-level", "debug"])
    assert (args.port, args.max_queue, args.log_level) == (65535, 1, "debug")


def test_help_shows_the_defaults(capsys):
    for command, shown in [
        (
            "serve",
            ["(default: 8000)", "(default: info)", "(default: 256)", "(default: 1048576)", "(default: 8)"],
        ),
        (
            "generate",
            ["(default: 128)", "(default: 1.0)", "(default: 0)", "(default: --stream)", "only with --chat"],
        ),
        ("demo", ["(default: 6)", "(default: 3)"]),
    ]:
        code, out, _ = run(capsys, command, "--help")
        assert code == 0
        text = " ".join(out.split())  # argparse wraps lines
        for piece in shown:
            assert piece in text, (command, piece)
        assert "(default: None)" not in text and "(default: False)" not in text


# -- Ctrl-C and a closed pipe ----------------------------------------------------------------------------


def test_ctrl_c_while_loading_exits_130_without_a_traceback(monkeypatch, capsys):
    import amphista.serve.loading

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(amphista.serve.loading, "load_decoder", interrupted)
    for argv in (["generate", "--prompt", "x"], ["serve", "--drafter", "none"]):
        code, out, err = run(capsys, *argv)
        assert code == 130, argv
        assert "Traceback" not in err and "KeyboardInterrupt" not in err and out == ""


def test_sigint_at_start_up_exits_130_quietly():
    # A real SIGINT, delivered while the model loads: the interpreter turns it into KeyboardInterrupt
    # wherever the main thread happens to be.
    code = textwrap.dedent(
        """
        import os, signal, sys, time
        import amphista.serve.loading as loading
        from amphista.cli import main

        def load_decoder(*args, **kwargs):
            print("loading", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60)
            raise SystemExit("SIGINT was not delivered")

        loading.load_decoder = load_decoder
        sys.exit(main(["generate", "--prompt", "Once upon a time"]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "loading" and proc.stdout == ""


def test_closed_pipe_exits_141_quietly():
    # `amphista generate ... | head -c 5`, made deterministic: after its first piece of text the command waits
    # until the reader has closed the pipe (the write end then polls POLLERR), so the next write must fail.
    code = textwrap.dedent(
        """
        import select, sys, time
        import amphista.serve.terminal as terminal
        from amphista.cli import main

        real_writer = terminal._writer

        def writer(stream):
            write = real_writer(stream)

            def write_then_wait(piece):
                write(piece)
                poll = select.poll()
                poll.register(sys.stdout.fileno(), select.POLLOUT)
                deadline = time.monotonic() + 60
                while not any(ev & select.POLLERR for _, ev in poll.poll(100)):
                    if time.monotonic() > deadline:
                        raise SystemExit("the reader never closed the pipe")
                    time.sleep(0.01)

            return write_then_wait

        terminal._writer = writer
        sys.exit(main(["generate", "--drafter", "none", "--prompt", "Once upon a time", "--max-new-tokens", "8"]))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    head = proc.stdout.read(5)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert head == b"Once "
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err
