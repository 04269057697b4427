"""--device and --dtype: every command that loads a target places it as asked, or says why it cannot."""

from __future__ import annotations

import json

import pytest
import torch

import amphista
from amphista import bundled
from amphista.cli import TARGET_DTYPES, main
from amphista.errors import InputError
from amphista.serve.chat import encode
from amphista.serve.textstream import continuation_text
from amphista.target import DTYPE_NAMES, TargetModel, parse_device, parse_dtype
from amphista.training import DistillConfig, distill
from amphista.training import distillation as distill_module

PROMPT = "Once upon a time"


def _greedy_text(target, n):
    ids = encode(target.tokenizer, PROMPT)
    new = amphista.VanillaDecoder(target).generate(ids, max_new_tokens=n, temperature=0).new_tokens
    return continuation_text(target.tokenizer, ids, new)


def test_the_command_line_offers_exactly_the_dtypes_the_loader_knows():
    assert TARGET_DTYPES == tuple(DTYPE_NAMES)
    assert parse_dtype("BF16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    assert parse_dtype("auto") == "auto"


def test_unknown_dtypes_and_devices_are_named_before_any_weight_loads():
    path = bundled.default_target_path()
    with pytest.raises(InputError, match="unknown dtype 'int8'.*bfloat16"):
        TargetModel.load(path, dtype="int8")
    with pytest.raises(InputError, match="unknown dtype"):
        TargetModel.load(path, dtype=torch.int8)
    with pytest.raises(InputError, match="unknown device 'gpu'.*cuda:N"):
        TargetModel.load(path, device="gpu")
    assert parse_device("cpu") == torch.device("cpu") and parse_device(None) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_gpu_this_machine_lacks_is_refused_with_the_fix(capsys):
    for name in ("cuda", "cuda:1"):
        with pytest.raises(InputError, match="no CUDA GPU.*--device cpu"):
            parse_device(name)
    assert main(["generate", "--prompt", PROMPT, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "Traceback" not in err


def test_generate_decodes_with_the_target_in_the_dtype_asked(monkeypatch, capsys):
    from amphista.serve import loading

    seen = []
    for name in ("VanillaDecoder", "SpeculativeDecoder"):
        real = getattr(loading, name)
        monkeypatch.setattr(
            loading, name, lambda target, *a, _real=real, **k: seen.append(target) or _real(target, *a, **k)
        )
    want = PROMPT + _greedy_text(bundled.load_target(None, "bfloat16", "cpu"), 32) + "\n"
    for drafter in ("none", "medusa"):
        args = [
            "generate",
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "32",
            "--drafter",
            drafter,
            "--tree",
            "chain",
        ]
        assert main([*args, "--dtype", "bf16", "--device", "cpu", "--no-stream"]) == 0
        assert capsys.readouterr().out == want, drafter
        assert seen[-1].dtype == torch.bfloat16 and seen[-1].device.type == "cpu"
    assert len(seen) == 2


def test_serve_loads_its_decoder_in_the_dtype_asked():
    from amphista.serve.loading import load_decoder

    decoder = load_decoder(None, "amphista", "chain", dtype="bfloat16", device="cpu")
    assert decoder.target.dtype == torch.bfloat16
    assert {p.device.type for p in decoder.drafter.parameters()} == {"cpu"}


def test_distill_runs_the_target_in_the_dtype_asked(tmp_path, monkeypatch):
    seen = []
    real = distill_module.VanillaDecoder

    def spy(target, *args, **kwargs):
        seen.append(target.dtype)
        return real(target, *args, **kwargs)

    monkeypatch.setattr(distill_module, "VanillaDecoder", spy)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\nThe little dog\n")
    target = str(bundled.default_target_path())
    for dtype, want in (("bfloat16", torch.bfloat16), ("auto", torch.float32)):
        out = tmp_path / f"{dtype}.jsonl"
        cfg = DistillConfig(target=target, prompts=str(prompts), out=str(out), max_new_tokens=8, temperature=0.0,
                            progress=False, dtype=dtype, device="cpu")  # fmt: skip
        assert distill(cfg)["written"] == 2
        assert seen[-1] == want
        assert len(out.read_text().splitlines()) == 2
    with pytest.raises(InputError, match="unknown device"):
        distill(
            DistillConfig(target=target, prompts=str(prompts), out=str(tmp_path / "x.jsonl"), device="gpu")
        )


def test_heads_accuracy_reads_a_target_in_another_dtype(tmp_path, capsys):
    data = tmp_path / "held.jsonl"
    text = "Once upon a time, there was a little girl named Lily. She liked to play in the park with her friends."
    data.write_text(json.dumps({"text": text}) + "\n")
    out = tmp_path / "acc.json"
    drafter = str(bundled.default_drafter_path("amphista"))
    args = ["heads-accuracy", "--drafter", drafter, "--data", str(data), "--json", str(out)]
    assert main([*args, "--dtype", "bfloat16"]) == 0
    top1 = [row[0] for row in json.loads(out.read_text())["top_k"]]
    assert len(top1) == 4 and top1[0] > 0.5  # the trained drafter still predicts the story's next tokens
