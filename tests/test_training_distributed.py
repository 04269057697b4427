"""The `amphista train` command for real: 2-process DDP on CPU (gloo) against one process, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_training_helpers import config, save_target, write_chats

from amphista.cli import main
from amphista.target import TargetModel
from amphista.training import train
from amphista.tree import load_accuracies

# Accumulated over 6 AdamW steps at lr 3e-3 the two runs differ only by float summation order
# (all-reduce of two halves vs one sum): observed ~1e-5 on parameters of magnitude ~1.
PARAM_ATOL = 1e-4
LOSS_RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not installed")
def test_two_process_ddp_matches_one_process(tmp_path):
    target_dir = save_target(tmp_path / "target")
    data = write_chats(tmp_path / "chats.jsonl", n=24)
    args = ["--target", target_dir, "--data", data, "--drafter", "amphista", "--max-steps", "6",
            "--batch-size", "4", "--seq-len", "64", "--set", "log_every=1", "--set", "eval_fraction=0.1",
            "--no-progress"]  # fmt: skip
    # --multi_gpu on a machine without CUDA: torchrun-style processes that train on the CPU with gloo.
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "amphista.cli", "train"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    ddp_out = str(tmp_path / "ddp")
    proc = subprocess.run(launch + args + ["--out", ddp_out], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = os.listdir(os.path.join(ddp_out, "checkpoints", "step-00000006"))
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(ckpt)  # really two processes

    single = config(tmp_path / "one", [data], drafter="amphista", max_steps=6, batch_size=4, seq_len=64,
                    eval_fraction=0.1, mixed_precision="no")  # fmt: skip
    train(single, target=TargetModel.load(target_dir))
    a, b = load_file(os.path.join(ddp_out, "model.safetensors")), load_file(os.path.join(single.out, "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=PARAM_ATOL)
    assert _losses(ddp_out) == pytest.approx(_losses(single.out), rel=LOSS_RTOL)


def test_cli_train_then_heads_accuracy(tmp_path, capsys):
    target_dir = save_target(tmp_path / "target")
    data = write_chats(tmp_path / "chats.jsonl", n=20)
    out = str(tmp_path / "medusa")
    rc = main(["train", "--target", target_dir, "--data", data, "--drafter", "medusa", "--out", out,
               "--max-steps", "3", "--batch-size", "4", "--seq-len", "48", "--lr", "0.01", "--no-progress",
               "--set", "num_heads=3", "--set", "head_weighting=equal", "--set", "eval_fraction=0.2"])  # fmt: skip
    assert rc == 0
    saved = json.load(open(os.path.join(out, "training_config.json")))
    assert saved["drafter_config"] == {"num_heads": 3} and saved["head_weighting"] == "equal"
    assert len(load_accuracies(os.path.join(out, "head_accuracy.json"))) == 3
    capsys.readouterr()
    rc = main(["heads-accuracy", "--target", target_dir, "--drafter", out, "--data", data,
               "--json", str(tmp_path / "acc.json")])  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out
    assert "top-1" in table and "top-5" in table and len(load_accuracies(tmp_path / "acc.json")) == 3
    # A second run into the same folder must not silently mix with the first one's checkpoints.
    assert main(["train", "--target", target_dir, "--data", data, "--out", out, "--max-steps", "1",
                 "--batch-size", "4", "--no-progress"]) == 2  # fmt: skip


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
