"""What a training run leaves behind: metrics.jsonl (+ TensorBoard), and the drafter folder itself.

The output folder is a drafter `amphista.load_drafter` reads (config.json + model.safetensors), plus
training_config.json, head_accuracy.json (read by `amphista.tree.load_accuracies`) and metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch

from .checkpoint import atomic_write, atomic_write_json


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on CUDA; peak resident memory of this process elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class MetricsLog:
    """Append-only metrics.jsonl on the main process. A resumed run first drops lines past its step."""

    def __init__(self, out: str, resume_step: int = 0, enabled: bool = True, tensorboard: bool = False):
        self.path = os.path.join(out, "metrics.jsonl")
        self.enabled, self.last, self.writer, self.start = enabled, None, None, time.time()
        if not enabled:
            return
        os.makedirs(out, exist_ok=True)
        kept = []
        if resume_step and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by the interruption
                    if rec.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        atomic_write(self.path, lambda f: f.write("".join(kept).encode()))
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=resume_step or None)
            except ImportError:
                print("tensorboard is not installed: logging to metrics.jsonl only (pip install tensorboard)")

    def record(self, step, epoch, lr, sums, loss, grad_norm, tokens_per_s, peak_mb) -> dict:
        """sums (4, K): lm CE sum, align CE sum, top-1 hits, label count per head since the last record."""
        count = sums[3].clamp(min=1)
        metrics = {
            "step": step, "epoch": epoch, "loss": round(loss, 6), "lr": lr,
            "lm_loss": [round(float(x), 5) for x in sums[0] / count],
            "align_loss": [round(float(x), 5) for x in sums[1] / count],
            "acc": [round(float(x), 4) for x in sums[2] / count],
            "grad_norm": grad_norm, "tokens_per_s": round(tokens_per_s, 1), "peak_memory_mb": round(peak_mb, 1),
        }  # fmt: skip
        self.write(metrics)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/tokens_per_s", tokens_per_s, step)
            for k, acc in enumerate(metrics["acc"]):
                self.writer.add_scalar(f"train/acc_head{k + 1}", acc, step)
        return metrics

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time() - self.start, 2)}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if "loss" in record:
            self.last = record
        if self.writer is not None and "eval" in record:
            for k, row in enumerate(record["eval"]["top_k"]):
                self.writer.add_scalar(f"eval/top1_head{k + 1}", row[0], record["step"])

    @staticmethod
    def postfix(m: dict) -> str:
        acc = "/".join(f"{a:.2f}" for a in m["acc"])
        return f"loss {m['loss']:.3f} acc {acc} {m['tokens_per_s']:.0f} tok/s"

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def save_outputs(cfg, drafter, accuracy: dict | None, steps: int) -> None:
    """Write the drafter, its training config and head accuracies into cfg.out, each file atomically;
    checkpoints/, metrics.jsonl and anything else already there stay."""
    drafter.save_pretrained(cfg.out)
    drafter_cfg = getattr(drafter, "config", None)
    drafter_cfg = drafter_cfg.to_dict() if hasattr(drafter_cfg, "to_dict") else cfg.drafter_config
    atomic_write_json(
        os.path.join(cfg.out, "training_config.json"), {**cfg.to_json(), "steps": steps, "drafter_resolved": drafter_cfg}
    )
    if accuracy is not None:
        atomic_write_json(os.path.join(cfg.out, "head_accuracy.json"), accuracy)
