"""Training checkpoints, written atomically: a temporary name, flushed, then renamed into place.

`out/checkpoints/step-00000100/` holds accelerate's state (drafter weights, optimizer, scheduler, each
process's RNG) and `trainer_state.json` (step, data position, config). An interrupted write leaves only
a `.step-*.tmp` folder, which is never mistaken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from ..errors import CheckpointError
from ..files import atomic_write, atomic_write_json, default_permissions, fsync_dir  # noqa: F401 (re-exported)

PATTERN = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def list_checkpoints(out: str) -> list[str]:
    """Complete checkpoints under out/checkpoints (or directly in out), oldest first.

    A checkpoint folder gets its final name only once fully written, so a half-written one never
    matches the pattern."""
    folder = checkpoint_dir(out) if os.path.isdir(checkpoint_dir(out)) else out
    if not os.path.isdir(folder):
        return []
    names = sorted((int(m.group(1)), name) for name in os.listdir(folder) if (m := PATTERN.match(name)))
    return [os.path.join(folder, name) for _, name in names]


def find_checkpoint(out: str, resume: bool | str) -> str | None:
    """`resume` True: the newest checkpoint under out (None when there is none); a path: that checkpoint,
    or the newest one inside that folder."""
    if isinstance(resume, str) and resume:
        if os.path.isfile(os.path.join(resume, STATE_FILE)):
            return resume
        found = list_checkpoints(resume)
        if not found:
            raise CheckpointError(f"no checkpoint at {resume!r}: point --resume at a checkpoints/step-N folder")
        return found[-1]
    found = list_checkpoints(out)
    return found[-1] if found else None


def save_state(accelerator, out: str, step: int, info: dict, keep: int = 2) -> str:
    """Checkpoint everything (all processes must call): accelerate's state (model, optimizer, scheduler,
    every process's RNG; sharded under DeepSpeed/FSDP) plus our data position, into a temporary folder
    that is renamed into place only once complete."""
    folder = checkpoint_dir(out)
    final = os.path.join(folder, f"step-{step:08d}")
    tmp = os.path.join(folder, f".step-{step:08d}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(folder, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(os.path.join(tmp, STATE_FILE), {"step": step, **info})
        for name in os.listdir(tmp):
            if os.path.isfile(os.path.join(tmp, name)):
                with open(os.path.join(tmp, name), "rb") as f:
                    os.fsync(f.fileno())
        default_permissions(tmp)  # accelerate's safetensors files are owner-only whatever the umask
        shutil.rmtree(final, ignore_errors=True)  # only when re-saving the same step after a resume
        os.rename(tmp, final)
        fsync_dir(folder)
        if keep > 0:
            for old in list_checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_state(accelerator, path: str) -> dict:
    """Restore a checkpoint written by save_state; returns its trainer_state.json."""
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            info = json.load(f)
        accelerator.load_state(path)
    except Exception as e:
        raise CheckpointError(f"cannot resume from {path!r} ({e}): delete it to resume from an older one") from e
    return info
