"""What a result was measured on: hardware, library versions, the target."""

from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(target) -> dict:
    import transformers

    from .. import __version__

    device = target.device
    env = {
        "device": str(device),
        "dtype": str(target.dtype).removeprefix("torch."),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "amphista": __version__,
        "target": {
            "name_or_path": target.name_or_path,
            "architecture": target.architecture,
            "hidden_size": target.hidden_size,
            "vocab_size": target.vocab_size,
            "num_layers": target.num_layers,
            "parameters": sum(p.numel() for p in target.model.parameters()),
            "attention": getattr(target.config, "_attn_implementation", None),
        },
    }
    return env


def drafter_info(drafter, path=None) -> dict:
    info = {
        "class": type(drafter).__name__,
        "path": str(path) if path else None,
        "num_heads": getattr(drafter, "num_heads", None),
        "dtype": str(getattr(drafter, "dtype", "")).removeprefix("torch.") or None,
    }
    config = getattr(drafter, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        info["type"] = getattr(drafter, "drafter_type", None)
        info["config"] = config.to_dict()
        info["built_for"] = getattr(drafter, "built_for", None)
    info["parameters"] = sum(p.numel() for p in drafter.parameters())
    return info
