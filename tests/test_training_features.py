"""The target-feature cache: computed once per (target, data), equal losses, detection of damaged entries."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file
from test_training_helpers import config, tiny_target, write_stories

from amphista.errors import InputError
from amphista.training import train
from amphista.training.cli import train_config_from_args
from amphista.training.features import DATA_FILE, META_FILE


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AMPHISTA_CACHE", str(tmp_path / "usercache"))


def count_forwards(target):
    """Counts the examples (sequences) the target's decoder runs on."""
    seen = []
    target.base.register_forward_hook(lambda module, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]),
                                      with_kwargs=True)  # fmt: skip
    return seen


def losses(out):
    return [r["loss"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]


def entries(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def run(tmp_path, name, data, target, **kw):
    # No held-out split: its evaluation runs the target too, which would blur the forward counts.
    cfg = config(tmp_path / name, [data], **{"max_steps": 12, "batch_size": 4, "feature_cache": str(tmp_path / "fc"),
                                             "eval_fraction": 0.0, **kw})  # fmt: skip
    return train(cfg, target=target), cfg


@pytest.mark.parametrize("drafter", ["medusa", "amphista"])
def test_cached_features_give_the_losses_of_uncached_training(tmp_path, drafter):
    data = write_stories(tmp_path / "s.jsonl", n=24)
    target = tiny_target()
    run(tmp_path, "plain", data, target, drafter=drafter, feature_cache=None)
    run(tmp_path, "cached", data, target, drafter=drafter, feature_dtype="float32")
    plain, cached = losses(tmp_path / "plain" / "out"), losses(tmp_path / "cached" / "out")
    assert len(plain) == 12 and cached == pytest.approx(plain, rel=1e-5)
    # float16 features: what the default stores for a float32 target
    run(tmp_path, "half", data, target, drafter=drafter, feature_cache=str(tmp_path / "fc16"))
    assert losses(tmp_path / "half" / "out") == pytest.approx(plain, rel=1e-3)


def test_target_runs_once_per_example_and_not_at_all_in_a_second_run(tmp_path):
    data = write_stories(tmp_path / "s.jsonl", n=24)
    target = tiny_target()
    seen = count_forwards(target)
    result, cfg = run(tmp_path, "a", data, target, epochs=3.0, max_steps=None)
    assert result.steps == 3 * 6
    assert sum(seen) == 24  # 24 training examples, 3 epochs: each example through the target once
    seen.clear()
    run(tmp_path, "b", data, target, drafter="amphista", epochs=3.0, max_steps=None)
    assert sum(seen) == 0
    assert len(entries(tmp_path / "fc")) == 1
    seen.clear()
    run(tmp_path, "c", data, target, epochs=3.0, max_steps=None, feature_cache=None)
    assert sum(seen) == 3 * 6 * 4 and len(entries(tmp_path / "fc")) == 1  # without the cache: every batch


def test_other_data_or_target_gets_its_own_entry(tmp_path):
    data = write_stories(tmp_path / "s.jsonl", n=16)
    run(tmp_path, "a", data, tiny_target())
    assert len(entries(tmp_path / "fc")) == 1
    with open(data, "a") as f:  # one more story: other examples
        f.write(json.dumps({"text": "Once upon a time, a fox ran to the park. The end."}) + "\n")
    run(tmp_path, "b", data, tiny_target())
    assert len(entries(tmp_path / "fc")) == 2
    run(tmp_path, "c", data, tiny_target(seed=1))  # same shapes and names, other weights
    assert len(entries(tmp_path / "fc")) == 3
    run(tmp_path, "d", data, tiny_target(), seq_len=32)
    assert len(entries(tmp_path / "fc")) == 4


def test_on_the_cpu_mixed_precision_is_for_the_drafter_only(tmp_path):
    """bfloat16 autocast trains the drafter; the target's hidden states (one cache entry for both precisions)
    and the held-out evaluation stay float32, as the drafter serves the float32 target on the CPU."""
    data = write_stories(tmp_path / "s.jsonl", n=24)
    target = tiny_target()
    seen, autocast_in_target = count_forwards(target), []
    target.base.register_forward_hook(lambda *_: autocast_in_target.append(torch.is_autocast_enabled("cpu")))
    kw = dict(epochs=1.0, max_steps=None, feature_dtype="float32", log_every=1)
    run(tmp_path, "fp32", data, target, mixed_precision="no", **kw)
    result, cfg = run(tmp_path, "bf16", data, target, mixed_precision="bf16", **kw)
    assert len(entries(tmp_path / "fc")) == 1 and sum(seen) == 24  # the bf16 run read the fp32 run's entry
    fp32, bf16 = losses(tmp_path / "fp32" / "out"), losses(tmp_path / "bf16" / "out")
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=3e-2)  # really bfloat16, and close
    saved = load_file(os.path.join(cfg.out, "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}  # float32 master weights
    # With a held-out split the evaluation runs the target (and the drafter) outside autocast too.
    run(tmp_path, "eval", data, target, mixed_precision="bf16", eval_fraction=0.2, feature_cache=None,
        max_steps=2)
    assert sum(seen) > 24 and not any(autocast_in_target)


def test_automatic_precision(monkeypatch):
    from amphista import cpu
    from amphista.training.trainer import resolve_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "native_bf16", lambda: True)
    assert resolve_precision("auto") == "bf16" and resolve_precision("no") == "no"
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)  # emulated bfloat16 runs slower than float32
    assert resolve_precision("auto") == "no" and resolve_precision("bf16") == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # set by `accelerate launch --mixed_precision`
    assert resolve_precision("auto") == "fp16"


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_meta", "bad_meta"])
def test_damaged_entry_is_rebuilt_not_trusted(tmp_path, damage, capsys):
    data = write_stories(tmp_path / "s.jsonl", n=16)
    target = tiny_target()
    run(tmp_path, "a", data, target, feature_dtype="float32")
    (key,) = entries(tmp_path / "fc")
    path, meta = tmp_path / "fc" / key / DATA_FILE, tmp_path / "fc" / key / META_FILE
    good = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "flip":
        path.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    elif damage == "no_meta":
        meta.unlink()
    else:
        meta.write_text("{not json")
    seen = count_forwards(target)
    run(tmp_path, "b", data, target, feature_dtype="float32")
    assert sum(seen) > 0  # recomputed
    assert path.read_bytes() == good
    assert losses(tmp_path / "b" / "out") == losses(tmp_path / "a" / "out")
    if damage != "no_meta":
        assert "rebuilding" in capsys.readouterr().err
    assert [n for n in os.listdir(tmp_path / "fc" / key) if n.endswith(".tmp")] == []


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    data = write_stories(tmp_path / "s.jsonl", n=16)
    target = tiny_target()
    calls = []

    def dying(module, args, kwargs, out):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    handle = target.base.register_forward_hook(dying, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "a", data, target)
    handle.remove()
    (key,) = entries(tmp_path / "fc")
    assert os.listdir(tmp_path / "fc" / key) == []  # no data file, no meta, no temporary left
    seen = count_forwards(target)
    run(tmp_path, "b", data, target)
    assert sum(seen) > 0 and sorted(os.listdir(tmp_path / "fc" / key)) == [DATA_FILE, META_FILE]


def test_cache_folder_has_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        data = write_stories(tmp_path / "s.jsonl", n=16)
        run(tmp_path, "a", data, tiny_target(), feature_cache=None)  # default folder: $AMPHISTA_CACHE/features
        assert not (tmp_path / "usercache").exists()  # the cache is off: nothing written
        run(tmp_path, "b", data, tiny_target(), feature_cache="auto")
        root = tmp_path / "usercache" / "features"
        (key,) = entries(root)
        assert stat.S_IMODE(os.stat(root / key).st_mode) == 0o755
        for name in (DATA_FILE, META_FILE):
            assert stat.S_IMODE(os.stat(root / key / name).st_mode) == 0o644
    finally:
        os.umask(old)


def test_short_run_reads_a_complete_entry_but_does_not_build_one(tmp_path):
    data = write_stories(tmp_path / "s.jsonl", n=32)
    target = tiny_target()
    run(tmp_path, "a", data, target, max_steps=2)  # 8 of 32 examples: no entry written
    assert entries(tmp_path / "fc") == []
    run(tmp_path, "b", data, target, max_steps=8)
    seen = count_forwards(target)
    run(tmp_path, "c", data, target, max_steps=2)
    assert sum(seen) == 0


def test_one_epoch_builds_the_entry_when_the_batch_size_does_not_divide_the_examples(tmp_path):
    data = write_stories(tmp_path / "s.jsonl", n=26)  # 6 batches of 4 and 2 examples left over
    target = tiny_target()
    result, _ = run(tmp_path, "a", data, target, epochs=1.0, max_steps=None)
    assert result.steps == 6 and len(entries(tmp_path / "fc")) == 1
    seen = count_forwards(target)
    run(tmp_path, "b", data, target, drafter="amphista", epochs=1.0, max_steps=None)
    assert sum(seen) == 0  # the second drafter reads the first one's entry


def test_resume_reads_the_cache(tmp_path):
    data = write_stories(tmp_path / "s.jsonl", n=24)
    target = tiny_target()
    full, _ = run(tmp_path, "full", data, target, save_every=3)

    class Crash(Exception):
        pass

    def crash(step, metrics):
        if step == 5:
            raise Crash

    cfg = config(tmp_path / "part", [data], max_steps=12, batch_size=4, save_every=3, eval_fraction=0.0,
                 feature_cache=str(tmp_path / "fc"))
    with pytest.raises(Crash):
        train(cfg, target=target, callback=crash)
    seen = count_forwards(target)
    cfg.resume = True
    train(cfg, target=target)
    assert sum(seen) == 0
    assert losses(cfg.out) == pytest.approx(losses(tmp_path / "full" / "out"), abs=1e-6)


def test_cli_flags(tmp_path):
    from amphista.cli import build_parser

    parser = build_parser()
    base = ["train", "--data", "x.jsonl", "--out", str(tmp_path / "o")]
    assert train_config_from_args(parser.parse_args(base)).feature_cache == "auto"
    cfg = train_config_from_args(parser.parse_args([*base, "--feature-cache", str(tmp_path / "f")]))
    assert cfg.feature_cache == str(tmp_path / "f")
    assert train_config_from_args(parser.parse_args([*base, "--no-feature-cache"])).feature_cache is None
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--no-feature-cache", "--feature-cache", "d"])
    with pytest.raises(InputError, match="feature_dtype"):
        config(tmp_path, ["x"], feature_dtype="int8").validate()


def test_cli_trains_with_and_without_the_cache(tmp_path, capsys):
    from test_training_helpers import save_target

    from amphista.cli import main

    target = save_target(tmp_path / "target")
    data = write_stories(tmp_path / "s.jsonl", n=16)
    common = ["train", "--target", target, "--data", data, "--batch-size", "4", "--max-steps", "4",
              "--seq-len", "64", "--no-progress", "--save-every", "0"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "a"), "--feature-cache", str(tmp_path / "fc")]) == 0
    assert len(entries(tmp_path / "fc")) == 1 and "target features: cached" in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "b"), "--no-feature-cache", "--drafter", "medusa"]) == 0
    assert "target features" not in capsys.readouterr().out and len(entries(tmp_path / "fc")) == 1
    assert main([*common, "--out", str(tmp_path / "c"), "--feature-cache", str(tmp_path / "fc")]) == 0
    assert "target features: reusing" in capsys.readouterr().out


def test_target_probs_fill_only_labelled_rows_and_match_the_full_softmax():
    from amphista.training.features import TargetProbs, target_hidden
    from amphista.training.losses import target_probs

    target = tiny_target()
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :5] = 0  # a prompt: rows 0..3 of sequence 0 are never read
    mask[1, 8:] = 0  # padding
    hidden = target_hidden(target, ids).clone()
    full = torch.log_softmax(target.logits(hidden), -1)
    need = torch.zeros(2, 10, dtype=torch.bool)
    need[:, 1:9] = mask[:, 2:].bool()
    d2t = torch.tensor([2, 5, 17, 40, 100, 101, 300, 511])
    for columns in (None, d2t):  # the whole vocabulary; only the lm_head rows of a draft vocabulary
        probs = TargetProbs(target, columns)(hidden, mask)
        assert probs.shape == (2, 10, 512 if columns is None else len(d2t))
        torch.testing.assert_close(probs[need], target_probs(full, columns)[need], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probs[need].sum(-1), torch.ones(int(need.sum())))
        assert torch.isfinite(probs).all() and (probs[~need] == 0).all()
    # A target that scales its logits: the draft columns get the same scaling.
    target.logit_scale = 0.5
    full = torch.log_softmax(target.logits(hidden), -1)
    probs = TargetProbs(target, d2t)(hidden, mask)
    torch.testing.assert_close(probs[need], target_probs(full, d2t)[need], rtol=1e-5, atol=1e-6)
