"""The train / distill / heads-accuracy / bench / tree commands: one-line errors before long work, help
texts, the bundled default target, and the resume hint after Ctrl-C."""

from __future__ import annotations

import json
import os
import shlex

import pytest
from test_training_helpers import write_stories

from amphista import cli
from amphista.errors import InputError
from amphista.target import TargetModel
from amphista.training.data import check_output, read_text

BAD_BYTES = b'{"text": "Once upon a time"}\n{"text": "Once upon a \xff\xfe time"}\n'


def run(capsys, *argv):
    """amphista ARGV -> (exit status, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse rejects a value while parsing
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("amphista ")]
    assert len(lines) == 1 and lines[0].startswith(f"amphista {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_models(monkeypatch):
    """Loading a model is the long work every check must come before: here it fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(TargetModel, "load", classmethod(forbidden))
    monkeypatch.setattr("amphista.bench.loading.load_target", forbidden)
    monkeypatch.setattr("amphista.bundled.load_default_target", forbidden)


# ---- non-UTF-8 input files ----------------------------------------------------------------------------


def test_read_text_names_the_line_and_byte_offset(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(BAD_BYTES)
    with pytest.raises(
        InputError,
        match=rf"'.*bad\.jsonl' is not UTF-8 text: byte 0xff at line 2 \(byte offset {BAD_BYTES.index(0xFF)}\)",
    ):
        read_text(path, "data file")
    path.write_bytes("tête\n".encode())
    assert read_text(path) == "tête\n"


@pytest.mark.parametrize(
    "name, argv",
    [
        ("bad.jsonl", ["train", "--data", "{bad}", "--out", "{tmp}/out", "--max-steps", "1"]),
        ("bad.jsonl", ["distill", "--prompts", "{bad}", "--out", "{tmp}/d.jsonl"]),
        ("bad.txt", ["distill", "--prompts", "{bad}", "--out", "{tmp}/d.jsonl"]),
        ("bad.json", ["tree", "--accuracies", "{bad}", "--nodes", "8"]),
        ("bad.jsonl", ["bench", "--questions", "{bad}", "--out", "{tmp}/results"]),
    ],
)
def test_non_utf8_input_is_a_one_line_error(tmp_path, capsys, monkeypatch, name, argv):
    bad = tmp_path / name
    bad.write_bytes(BAD_BYTES)
    if argv[0] == "train":
        # The data is read once the target is there: a tiny one keeps this quick.
        from test_training_helpers import tiny_target

        monkeypatch.setattr(TargetModel, "load", classmethod(lambda cls, *a, **k: tiny_target()))
    else:
        monkeypatch.setattr(TargetModel, "load", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    code, _, err = run(capsys, *[a.format(bad=bad, tmp=tmp_path) for a in argv])
    line = one_line_error(err, argv[0])
    assert code == 2 and str(bad) in line and "line 2" in line and "0xff" in line, line


# ---- --out checked before the long work -------------------------------------------------------------


def test_check_output(tmp_path):
    afile = tmp_path / "corpus.txt"
    afile.write_text("keep me")
    with pytest.raises(InputError, match="is an existing file, not a folder"):
        check_output(afile, "--out", folder=True)
    with pytest.raises(InputError, match=r"cannot be created: .*corpus\.txt' is a file"):
        check_output(afile / "sub" / "deeper", "--out", folder=True)
    with pytest.raises(InputError, match="is a folder: pass a file name"):
        check_output(tmp_path, "--out", folder=False)
    # /proc refuses new files even to root, which os.access would have let through.
    with pytest.raises(InputError, match="not writable"):
        check_output("/proc/amphista-test/out", "--out", folder=True)
    before = sorted(os.listdir(tmp_path))
    check_output(tmp_path / "new" / "folder", folder=True)
    check_output(tmp_path / "new.jsonl", folder=False)
    check_output(afile, folder=False)  # an existing file to append to
    assert sorted(os.listdir(tmp_path)) == before and afile.read_text() == "keep me"  # nothing left behind


@pytest.mark.parametrize(
    "argv, where",
    [
        (["train", "--data", "{data}", "--out", "{file}"], "existing file"),
        (["train", "--data", "{data}", "--out", "{file}/run"], "is a file"),
        (["train", "--data", "{data}", "--out", "/proc/amphista-test/run"], "not writable"),
        (["distill", "--prompts", "{data}", "--out", "{tmp}"], "is a folder"),
        (["distill", "--prompts", "{data}", "--out", "{file}/d.jsonl"], "is a file"),
        (["bench", "--out", "{file}"], "existing file"),
        (["heads-accuracy", "--drafter", "{tmp}", "--data", "{data}", "--json", "{tmp}"], "is a folder"),
        (["tree", "--accuracies", "{acc}", "--nodes", "8", "--out", "{tmp}"], "is a folder"),
    ],
)
def test_unwritable_out_fails_before_any_model_loads(tmp_path, capsys, no_models, argv, where):
    data = write_stories(tmp_path / "stories.jsonl", n=4)
    (tmp_path / "corpus.txt").write_text("not a folder")
    (tmp_path / "acc.json").write_text(json.dumps({"top_k": [[0.5, 0.7], [0.3, 0.5]]}))
    args = [
        a.format(data=data, file=tmp_path / "corpus.txt", tmp=tmp_path, acc=tmp_path / "acc.json")
        for a in argv
    ]
    code, _, err = run(capsys, *args)
    line = one_line_error(err, argv[0])
    assert code == 2 and where in line, line
    assert (tmp_path / "corpus.txt").read_text() == "not a folder"


# ---- help texts and the bundled default target ------------------------------------------------------


def test_help_shows_defaults(capsys):
    for command, shown in [
        ("train", ["(default: 8)", "(default: amphista)", "bundled stories260K"]),
        ("distill", ["(default: 16)", "(default: 0.7)", "bundled stories260K"]),
        ("heads-accuracy", ["(default: 256)", "(default: 512)", "bundled stories260K"]),
        ("bench", ["(default: 3)", "(default: 256)"]),
    ]:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for piece in shown:
            assert piece in text, (command, piece)


def test_target_defaults_to_the_bundled_model():
    from amphista.bundled import default_target_path
    from amphista.training.cli import target_path, train_config_from_args

    parser = cli.build_parser()
    for argv in (["train", "--data", "d.jsonl", "--out", "o"], ["distill", "--prompts", "p.txt", "--out", "o.jsonl"],
                 ["heads-accuracy", "--drafter", "dr", "--data", "d.jsonl"]):  # fmt: skip
        args = parser.parse_args(argv)
        assert args.target is None and target_path(args.target) == str(default_target_path())
    cfg = train_config_from_args(parser.parse_args(["train", "--data", "d.jsonl", "--out", "o"]))
    assert cfg.target == str(default_target_path())
    assert target_path("mine") == "mine"


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--max-steps", "0"], "--max-steps"),
        (["--lr", "-1"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--seq-len", "2"], "--seq-len"),
        (["--set", "log_every=0"], "log_every"),
        (["--set", "warmup_ratio=2"], "warmup_ratio"),
        (["--set", "lr=-0.5"], "--lr"),
        (["--set", "target_dtype=int8"], "target_dtype"),
    ],
)
def test_bad_training_settings_name_the_flag(tmp_path, capsys, no_models, argv, flag):
    data = write_stories(tmp_path / "s.jsonl", n=4)
    code, _, err = run(capsys, "train", "--data", data, "--out", tmp_path / "out", *argv)
    assert code == 2 and flag in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "out")


# ---- Ctrl-C during train ------------------------------------------------------------------------------


def _interrupt_at(monkeypatch, at_step: int):
    from amphista.training import trainer

    real = trainer.MetricsLog.record

    def record(self, step, *args, **kwargs):
        if step == at_step:
            raise KeyboardInterrupt
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(trainer.MetricsLog, "record", record)


def test_interrupted_train_says_how_to_resume(tmp_path, capsys, monkeypatch):
    # The bundled target (no --target) trains here, which also covers the default.
    data = write_stories(tmp_path / "s.jsonl", n=16)
    argv = ["train", "--data", data, "--out", tmp_path / "my run", "--drafter", "medusa", "--max-steps", "4",
            "--save-every", "2", "--batch-size", "2", "--seq-len", "48", "--set", "log_every=1", "--no-progress"]  # fmt: skip
    _interrupt_at(monkeypatch, 3)
    code, _, err = run(capsys, *argv)
    assert code == 130
    hint = err.strip().splitlines()
    assert "step-00000002" in hint[-2], err
    words = shlex.split(hint[-1])
    assert words[:2] == ["amphista", "train"] and words[-1] == "--resume"
    monkeypatch.undo()
    code, out, err = run(capsys, *words[1:])  # the hint, run as printed, continues the run
    assert code == 0, err
    assert "resumed from" in out and "step 2" in out and "after 4 steps" in out


def test_interrupted_before_the_first_checkpoint(tmp_path, capsys, monkeypatch):
    data = write_stories(tmp_path / "s.jsonl", n=8)
    _interrupt_at(monkeypatch, 1)
    code, _, err = run(capsys, "train", "--data", data, "--out", tmp_path / "out", "--max-steps", "4",
                       "--save-every", "2", "--batch-size", "2", "--seq-len", "48", "--set", "log_every=1")  # fmt: skip
    assert code == 130 and "nothing to resume" in err and "--resume" not in err, err


def test_paths_in_a_train_config_become_text(tmp_path):
    # The config is written to JSON with every checkpoint and compared on resume: a Path must not break it.
    import dataclasses
    import json
    from pathlib import Path

    from amphista.training import TrainConfig

    cfg = TrainConfig(target=Path("model"), data=Path("a.jsonl"), eval_data=[Path("b.jsonl")], out=tmp_path / "run")
    assert json.loads(json.dumps(dataclasses.asdict(cfg)))["data"] == ["a.jsonl"]
    assert (cfg.target, cfg.out, cfg.eval_data) == ("model", str(tmp_path / "run"), ["b.jsonl"])
