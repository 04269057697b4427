"""Self-distillation: completion and multi-turn chat output, and resuming without duplicates or losses."""

from __future__ import annotations

import json

import pytest
from test_training_helpers import CHATML, tiny_target

from amphista.training import DistillConfig, distill, load_examples
from amphista.training import distillation as distill_module


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_completion_mode_for_a_base_model(tmp_path):
    prompts = tmp_path / "openings.txt"
    prompts.write_text("Once upon a time\n\nThe little dog\nLily and Tom\n")
    out = tmp_path / "out.jsonl"
    cfg = DistillConfig(prompts=str(prompts), out=str(out), max_new_tokens=6, batch_size=2, num_samples=2,
                        temperature=0.8, progress=False)  # fmt: skip
    stats = distill(cfg, target=tiny_target())
    assert stats["mode"] == "completion" and stats["written"] == 6
    records = _records(out)
    assert sorted(r["id"] for r in records) == ["1:0", "1:1", "3:0", "3:1", "4:0", "4:1"]  # line numbers
    by_id = {r["id"]: r["text"] for r in records}
    assert by_id["3:0"].startswith("The little dog") and len(by_id["3:0"]) > len("The little dog")
    examples, (report,) = load_examples([str(out)], tiny_target().tokenizer, seq_len=64)
    assert report.malformed == [] and len(examples) == 6


def test_multi_turn_chat_is_continued_turn_by_turn(tmp_path):
    target = tiny_target()
    target.tokenizer.chat_template = CHATML
    prompts = tmp_path / "mt.jsonl"
    rows = [{"question_id": 81, "turns": ["Tell a story.", "Make it shorter."]}, {"turns": ["Hi."]}, {"bad": 1}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    cfg = DistillConfig(prompts=str(prompts), out=str(out), max_new_tokens=5, temperature=0.0, progress=False)
    assert distill(cfg, target=target)["mode"] == "chat"
    records = {r["id"]: r for r in _records(out)}
    assert set(records) == {"1:0", "2:0"}
    turns = records["1:0"]["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert turns[2]["value"] == "Make it shorter."
    _, (report,) = load_examples([str(out)], target.tokenizer, seq_len=128)
    assert report.examples + report.skipped == 2


def test_distill_resumes_without_duplicates_or_losses(tmp_path, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"Story number {i} begins\n" for i in range(10)))
    out = tmp_path / "out.jsonl"
    cfg = DistillConfig(prompts=str(prompts), out=str(out), max_new_tokens=4, batch_size=3, temperature=0.0,
                        progress=False)  # fmt: skip
    target = tiny_target()
    real, calls = distill_module._generate, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during the third batch
        return real(*args, **kw)

    monkeypatch.setattr(distill_module, "_generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        distill(cfg, target=target)
    assert len(_records(out)) == 6
    with open(out, "a") as f:
        f.write('{"id": "9:0", "text": "cut in the mi')  # a write torn by the kill
    monkeypatch.setattr(distill_module, "_generate", real)
    stats = distill(cfg, target=target)
    assert stats == {"total": 10, "written": 4, "already_done": 6, "mode": "completion"}
    ids = [r["id"] for r in _records(out)]  # every line parses: the torn one is gone
    assert sorted(ids) == sorted(f"{i}:0" for i in range(1, 11)) and len(ids) == len(set(ids))
    again = distill(cfg, target=target)  # a finished run is a no-op
    assert again["written"] == 0 and len(_records(out)) == 10


def test_prompt_file_and_output_are_checked_before_the_target_loads(tmp_path, monkeypatch):
    from amphista.errors import InputError
    from amphista.target import TargetModel

    monkeypatch.setattr(TargetModel, "load", classmethod(lambda *a, **k: pytest.fail("target loaded")))
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"Once upon a time\nLa ni\xf1a\n")
    cfg = DistillConfig(target="unused", prompts=str(prompts), out=str(tmp_path / "out.jsonl"), progress=False)
    with pytest.raises(InputError, match=r"p.txt' is not UTF-8 text: byte 0xf1 at line 2"):
        distill(cfg)
    prompts.write_text("Once upon a time\n")
    for out, message in [(tmp_path, "is a folder"), (prompts / "out.jsonl", "is a file, not a folder")]:
        cfg.out = str(out)
        with pytest.raises(InputError, match=message):
            distill(cfg)
    cfg.out = str(tmp_path / "out.jsonl")
    for field, value, flag in [("batch_size", 0, "--batch-size"), ("top_p", 1.5, "--top-p"),
                               ("temperature", -1.0, "--temperature"), ("num_samples", 0, "--num-samples")]:  # fmt: skip
        with pytest.raises(InputError, match=flag):
            distill(DistillConfig(**{**cfg.__dict__, field: value}))


def test_text_prompts_keep_their_line_numbers_whatever_the_newlines(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"one\r\n\r\ntwo\rthree\x0cstill three\n")
    got = [(p.id, p.turns) for p in distill_module.read_prompts(str(prompts))]
    assert got == [("1", ["one"]), ("3", ["two"]), ("4", ["three\x0cstill three"])]
