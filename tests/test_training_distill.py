"""Self-distillation: completion and multi-turn chat output, and resuming without duplicates or losses."""

from __future__ import annotations

import json

import pytest
from test_training_helpers import CHATML, tiny_target

from amphista import VanillaDecoder
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
    stats = distill(cfg, target=target)
    assert stats["mode"] == "chat" and 0 < stats["new_tokens"] <= 3 * 5  # three answers of at most 5 tokens
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
    monkeypatch.setattr(distill_module, "CHUNK_BATCHES", 1)  # a write per batch of 3
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
    assert {k: stats[k] for k in ("total", "written", "already_done", "too_long", "mode")} == {
        "total": 10, "written": 4, "already_done": 6, "too_long": 0, "mode": "completion"
    }  # fmt: skip
    assert 0 < stats["new_tokens"] <= 4 * 4
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


def test_greedy_answers_are_each_prompts_own_generate(tmp_path):
    # Five prompts of different lengths through 2 rows at once: rows leave and others join mid-batch.
    lines = ["Once", "The little dog ran to the", "Lily and Tom went", "A bird", "Sam saw a big red ball in the"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    cfg = DistillConfig(prompts=str(prompts), out=str(out), max_new_tokens=12, batch_size=2, temperature=0.0,
                        progress=False)  # fmt: skip
    target = tiny_target()
    distill(cfg, target=target)
    tok, decoder = target.tokenizer, VanillaDecoder(target)
    texts = {r["id"]: r["text"] for r in _records(out)}
    for n, line in enumerate(lines, 1):
        ids = tok(line)["input_ids"]
        new = decoder.generate(ids, max_new_tokens=12).new_tokens
        new = new[: new.index(2)] if 2 in new else new  # cut at EOS
        assert texts[f"{n}:0"] == tok.decode(ids + new, skip_special_tokens=True)


def test_sampled_answers_follow_the_seed(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\n" * 6)  # one prompt six times: only the seeds tell them apart

    def run(name, seed):
        cfg = DistillConfig(prompts=str(prompts), out=str(tmp_path / name), max_new_tokens=10, batch_size=2,
                            temperature=1.0, seed=seed, progress=False)  # fmt: skip
        distill(cfg, target=tiny_target())
        return {r["id"]: r["text"] for r in _records(tmp_path / name)}

    first, again, other = run("a.jsonl", 0), run("b.jsonl", 0), run("c.jsonl", 1)
    assert first == again
    assert len(set(first.values())) > 2  # rows are not seeded alike
    assert sum(first[i] != other[i] for i in first) >= 3


def test_a_target_the_batch_engine_cannot_hold_is_answered_one_prompt_at_a_time(tmp_path, monkeypatch):
    from amphista.errors import BatchingError
    from amphista.kv_cache import RowsCache

    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\nThe little dog\nLily and Tom went\n")

    def run(name):
        cfg = DistillConfig(prompts=str(prompts), out=str(tmp_path / name), max_new_tokens=8, batch_size=2,
                            temperature=0.8, seed=3, progress=False)  # fmt: skip
        distill(cfg, target=tiny_target())
        return {r["id"]: r["text"] for r in _records(tmp_path / name)}

    batched = run("batched.jsonl")

    def refuse(*args, **kwargs):
        raise BatchingError("batched decoding needs keys and values of one head size")

    monkeypatch.setattr(RowsCache, "write", refuse)
    assert run("single.jsonl") == batched  # each answer with the seed its row had in the batch


def test_prompts_that_fill_the_context_window_are_skipped_and_named(tmp_path, capsys):
    target = tiny_target()  # a context window of 512 tokens
    target.tokenizer.chat_template = CHATML
    long = "the dog ran " * 200
    rows = [{"turns": ["Hi.", "Tell a story."]}, {"turns": [long]}, {"turns": ["Hello.", long]}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    cfg = DistillConfig(prompts=str(prompts), out=str(out), max_new_tokens=4, temperature=0.0, progress=False)
    stats = distill(cfg, target=target)
    assert stats["written"] == 2 and stats["too_long"] == 1
    assert "skipped 1 prompts that fill the target's context window of 512 tokens" in capsys.readouterr().out
    records = {r["id"]: r["conversations"] for r in _records(out)}
    assert set(records) == {"1:0", "3:0"}  # prompt 2 is skipped
    assert [t["from"] for t in records["1:0"]] == ["human", "gpt", "human", "gpt"]
    assert [t["value"] for t in records["3:0"]][:1] == ["Hello."]
    assert len(records["3:0"]) == 2  # the conversation ends before its long turn
