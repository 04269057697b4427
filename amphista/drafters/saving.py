"""Saving drafters in the Hugging Face layout: config.json + model.safetensors + README.md.

config.json holds everything needed to rebuild the modules, plus what the drafter was built for. The
borrowed embedding table and shared lm_head are never saved: they come from the target at load time.
Loading (drafters/io.py) knows every drafter class; saving needs none of them, so the drafters' base
(`HeadDrafter.save_pretrained`) imports this module and nothing imports back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import CheckpointError, InputError
from ..files import atomic_path, atomic_write_text

FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"


def save_drafter(drafter, path) -> None:
    """Write config.json, model.safetensors and README.md into the folder `path`, as Hugging Face's
    save_pretrained does: the folder is created if needed, each of these files is written to a temporary
    file beside it and renamed into place (a crash leaves the previous file, never a half-written one),
    and every other file and subfolder in `path` is left alone.

    README.md is written only when absent or when it is the unedited card an earlier save wrote; a
    README.md of your own, or a card you edited, is kept as it is."""
    from safetensors.torch import save_file

    from .. import __version__

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a directory: choose a folder to save the drafter in")
    meta = {
        "format_version": FORMAT_VERSION,
        "drafter_type": drafter.drafter_type,
        "config": drafter.config.to_dict(),
        "built_for": drafter.built_for,
        "dtype": str(drafter.dtype).removeprefix("torch."),
        "amphista_version": __version__,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Weights first: they are the write most likely to fail (a full disk), and then nothing has
        # changed. A crash between two renames leaves an old and a new file, which load_drafter reports
        # when they do not fit together.
        with atomic_path(path / WEIGHTS_NAME) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
        atomic_write_text(path / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
        card = path / CARD_NAME
        if not card.exists() or _is_unedited_card(card):
            atomic_write_text(card, model_card(meta, sum(t.numel() for k, t in tensors.items() if k != "d2t")))
    except OSError as e:
        raise CheckpointError(
            f"cannot save the drafter in {path} ({e}): free some disk space or choose a folder you can write to"
        ) from e


CARD_MARK = "<!-- amphista model card, sha256 "


def _signed(card: str) -> str:
    """Sign a generated card so that a later save can tell it from one a person wrote or edited."""
    return f"{card}\n{CARD_MARK}{hashlib.sha256(card.encode()).hexdigest()} -->\n"


def _is_unedited_card(file: Path) -> bool:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    body, sep, last = text.rstrip("\n").rpartition("\n")
    if not sep or not last.startswith(CARD_MARK):
        return False
    return _signed(body) == text


def model_card(meta: dict, num_params: int) -> str:
    return _signed(_card_text(meta, num_params))


def _card_text(meta: dict, num_params: int) -> str:
    bf = meta["built_for"]
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in meta["config"].items())
    name = meta["drafter_type"].capitalize()
    n = meta["config"].get("draft_vocab_size") or 0
    vocab_note = (
        f"\nIts heads predict over a draft vocabulary of the {n:,} most frequent tokens of its training data; the\n"
        "`d2t` tensor in model.safetensors maps them to the target's ids.\n"
        if n
        else ""
    )
    return f"""---
library_name: amphista
tags: [speculative-decoding, {meta["drafter_type"]}]
base_model: {bf.get("name_or_path") or "unknown"}
---

# {name} drafter for `{bf.get("name_or_path") or bf.get("architecture", "a causal LM")}`

{"An" if name[0] in "AEIOU" else "A"} {name} drafter for lossless speculative decoding with amphista (drafter format {meta["format_version"]}, amphista {meta["amphista_version"]}).
It proposes the next {meta["config"]["num_heads"]} tokens in one parallel pass; the target verifies them,
so the output is exactly the target's own.

Built for: {bf.get("architecture", "?")}, hidden size {bf.get("hidden_size")}, vocabulary {bf.get("vocab_size")}.
Saved parameters: {num_params:,} (the target's embedding table{" and lm_head are" if meta["config"].get("shared_lm_head") else " is"}
borrowed from the target at load time and not stored here).
{vocab_note}
```python
import amphista
target = amphista.TargetModel.load("{bf.get("name_or_path") or "path/to/target"}")
drafter = amphista.load_drafter("path/to/this/folder", target=target)
out = amphista.SpeculativeDecoder(target, drafter).generate(input_ids, max_new_tokens=128)
```

## Config

| field | value |
|---|---|
{rows}
"""
