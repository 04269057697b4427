"""The frozen target's last hidden states, computed once per training set and reused.

A drafter reads only the target's last hidden state h_t and, for its alignment loss, the target's
log-probabilities, which are a function of h_t alone (the lm_head). So the target's full forward is needed
once per example, not once per epoch and drafter: the hidden states go into a cache entry on disk, and
every later epoch, resume and drafter trained on the same data and target reads them back (memory-mapped)
and recomputes the log-probabilities with one (rows x d) @ (d x V) product. The log-probabilities are not
stored: V floats per token would be ~100x the hidden state's size on a 49k vocabulary.

An entry is a folder `<folder>/<key>/` holding `hidden.bin` (every example's rows, in example order,
row-major) and `meta.json` (shape, dtype, checksum). The key is a digest of the target (name, config, a
sample of every weight), the examples' token ids, seq_len, the precision the forward ran in and the stored
dtype, so another target or other data gets its own entry. Both files are written under temporary names
and renamed into place, `meta.json` last; an entry whose meta is missing, whose size or checksum does not
match, is rebuilt and never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from array import array

import numpy as np
import torch

from ..errors import InputError
from ..files import atomic_path, atomic_write_json, dir_mode

FORMAT = 1
DATA_FILE, META_FILE = "hidden.bin", "meta.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# numpy has no bfloat16: every dtype is stored and memory-mapped as raw integers of its width.
RAW = {torch.float32: np.int32, torch.float16: np.int16, torch.bfloat16: np.int16}
FEATURE_DTYPES = ("auto", *DTYPES)
# Elements sampled per weight tensor for the target's digest: enough to tell two checkpoints (or two
# random initializations) apart, without reading 100s of MB of weights at every start.
DIGEST_SAMPLES = 4096


def default_folder() -> str:
    from ..sources import cache_dir

    return str(cache_dir() / "features")


def resolve_folder(setting: str | None) -> str | None:
    """TrainConfig.feature_cache -> the folder to use, or None when the cache is off."""
    if setting is None or setting is False or setting in ("", "off", "none"):
        return None
    return default_folder() if setting == "auto" else os.path.expanduser(os.fspath(setting))


def storage_dtype(setting: str, target_dtype: torch.dtype) -> torch.dtype:
    """`auto`: a 16-bit target's own dtype (an exact copy), else float16 (half the bytes; see
    docs/training.md for what it changes in the loss)."""
    if setting != "auto":
        return DTYPES[setting]
    return target_dtype if target_dtype in (torch.float16, torch.bfloat16) else torch.float16


def weights_digest(model: torch.nn.Module) -> str:
    """Names, shapes, dtypes and an evenly spaced sample of every weight: tells checkpoints apart cheaply."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        flat = t.detach().reshape(-1)
        if flat.numel() == 0 or flat.device.type == "meta":
            continue
        k = min(DIGEST_SAMPLES, flat.numel())
        # Integer spacing: a float32 linspace rounds past the end of tensors above 2^24 elements.
        idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(1, k - 1)
        h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_key(target, examples, seq_len: int, precision: str, dtype_setting: str) -> str:
    config = target.config.to_dict() if hasattr(target.config, "to_dict") else {}
    h = hashlib.sha256()
    identity = {
        "format": FORMAT, "name": target.name_or_path, "config": config, "weights": weights_digest(target.model),
        "seq_len": seq_len, "precision": precision, "dtype": dtype_setting,
    }  # fmt: skip
    h.update(json.dumps(identity, sort_keys=True, default=str).encode())
    for ex in examples:
        h.update(array("q", [len(ex.input_ids), *ex.input_ids]).tobytes())
    return h.hexdigest()[:24]


def file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


@torch.inference_mode()
def target_hidden(target, input_ids: torch.Tensor) -> torch.Tensor:
    """The target's last hidden state (B, T, d) for right-padded ids: its decoder only, no lm_head."""
    return target.base(input_ids=input_ids, use_cache=False).last_hidden_state


class FeatureCache:
    """A complete entry, memory-mapped: the hidden states of examples[i] are rows offsets[i]:offsets[i+1]."""

    def __init__(self, folder: str, lengths: list[int], meta: dict):
        self.folder, self.meta = folder, meta
        self.dtype = DTYPES[meta["dtype"]]
        self.hidden_size = int(meta["hidden_size"])
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        raw = np.memmap(os.path.join(folder, DATA_FILE), dtype=RAW[self.dtype], mode="r")
        self.rows = raw.reshape(-1, self.hidden_size)

    def hidden(self, indices: list[int], device) -> torch.Tensor:
        """(B, T, d) float32 for the examples `indices`, right-padded with zeros to the longest."""
        lengths = [int(self.offsets[i + 1] - self.offsets[i]) for i in indices]
        out = torch.zeros(len(indices), max(lengths), self.hidden_size)
        for b, (i, n) in enumerate(zip(indices, lengths)):
            part = np.array(self.rows[self.offsets[i] : self.offsets[i] + n])  # copy out of the page cache
            out[b, :n] = torch.from_numpy(part).view(self.dtype)
        return out.to(device, non_blocking=True)


def _expected_meta(key: str, lengths: list[int], hidden_size: int) -> dict:
    return {"format": FORMAT, "key": key, "examples": len(lengths), "tokens": int(sum(lengths)),
            "hidden_size": hidden_size}  # fmt: skip


def open_entry(folder: str, key: str, lengths: list[int], hidden_size: int) -> tuple[FeatureCache | None, str]:
    """The complete entry `key`, or (None, why it cannot be used)."""
    entry = os.path.join(folder, key)
    try:
        with open(os.path.join(entry, META_FILE)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None, "absent"
    except (OSError, ValueError) as e:
        return None, f"unreadable {META_FILE} ({e})"
    expected = _expected_meta(key, lengths, hidden_size)
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in expected.items()):
        return None, f"{META_FILE} describes other data"
    if meta.get("dtype") not in DTYPES:
        return None, f"unknown dtype {meta.get('dtype')!r}"
    path = os.path.join(entry, DATA_FILE)
    size = os.path.getsize(path) if os.path.isfile(path) else -1
    want = meta["tokens"] * hidden_size * DTYPES[meta["dtype"]].itemsize
    if size != want:
        return None, f"{DATA_FILE} holds {max(size, 0)} bytes, {want} expected (an interrupted or damaged write)"
    # A full read, cheap next to the forwards it saves (~1 s per GB): a flipped byte would silently train the
    # drafter on wrong features for every later run.
    if file_digest(path) != meta.get("blake2b"):
        return None, f"{DATA_FILE} does not match its checksum (damaged)"
    return FeatureCache(entry, lengths, meta), ""


class _Overflow(Exception):
    pass


def build_entry(target, examples, folder: str, key: str, dtype: torch.dtype, batch_size: int, pad_id: int,
                autocast, progress: bool) -> FeatureCache:  # fmt: skip
    """Run the target once over every example and write the entry `key` (atomically, meta last)."""
    from tqdm.auto import tqdm

    from .batching import collate

    entry = os.path.join(folder, key)
    try:
        os.makedirs(entry, mode=dir_mode(), exist_ok=True)
    except OSError as e:
        raise InputError(
            f"cannot create the feature cache folder {entry!r} ({e.strerror or e}): pass --feature-cache DIR "
            "with a writable folder, or --no-feature-cache"
        ) from e
    with _suppress_missing():
        os.remove(os.path.join(entry, META_FILE))  # the data below no longer matches an old meta
    lengths = [len(ex.input_ids) for ex in examples]
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    d, width = target.hidden_size, dtype.itemsize
    # Length-sorted batches: little padding; each example's rows are written at its own offset.
    order = sorted(range(len(examples)), key=lengths.__getitem__)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(total=int(sum(lengths)), disable=not progress, desc="target features", unit="tok")
    try:
        with atomic_path(os.path.join(entry, DATA_FILE)) as tmp:
            with open(tmp, "wb") as f:
                f.truncate(int(offsets[-1]) * d * width)
                for batch in batches:
                    ids, _ = collate([examples[i] for i in batch], pad_id)
                    with autocast():
                        hidden = target_hidden(target, ids.to(target.device))
                    hidden = hidden.to(dtype).cpu()
                    if not torch.isfinite(hidden).all():
                        raise _Overflow
                    for b, i in enumerate(batch):
                        f.seek(int(offsets[i]) * d * width)
                        f.write(hidden[b, : lengths[i]].contiguous().view(torch.uint8).numpy().tobytes())
                    bar.update(sum(lengths[i] for i in batch))
    finally:
        bar.close()
    path = os.path.join(entry, DATA_FILE)
    meta = {**_expected_meta(key, lengths, d), "dtype": str(dtype).removeprefix("torch."),
            "blake2b": file_digest(path), "target": target.name_or_path, "created": time.time()}  # fmt: skip
    atomic_write_json(os.path.join(entry, META_FILE), meta)
    return FeatureCache(entry, lengths, meta)


class _suppress_missing:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, FileNotFoundError)


def prepare(target, examples, *, folder: str, seq_len: int, precision: str, dtype_setting: str,
            batch_size: int, pad_id: int, autocast, build: bool, is_builder: bool = True, progress: bool = True,
            log=print) -> FeatureCache | None:  # fmt: skip
    """The cache entry for (target, examples): opened when complete, else built when `build`
    (by the process with `is_builder`; the others wait for its entry). None: train without a cache."""
    key = cache_key(target, examples, seq_len, precision, dtype_setting)
    lengths = [len(ex.input_ids) for ex in examples]
    cache, why = open_entry(folder, key, lengths, target.hidden_size)
    if cache is not None:
        log(f"target features: reusing {cache.folder} ({cache.meta['tokens']} tokens, {cache.meta['dtype']})")
        return cache
    if not build:
        log("target features: no cache entry, and this run is shorter than an epoch: computing them per batch")
        return None
    if not is_builder:
        # Another process on this machine builds the entry: poll the file system rather than wait in a
        # collective, whose timeout (30 min by default) a long first pass on a large target could exceed.
        while cache is None:
            time.sleep(2)
            cache, _ = open_entry(folder, key, lengths, target.hidden_size)
        return cache
    if why != "absent":
        log(f"target features: rebuilding {os.path.join(folder, key)}: {why}", file=sys.stderr)
    dtype = storage_dtype(dtype_setting, target.dtype)
    try:
        cache = build_entry(target, examples, folder, key, dtype, batch_size, pad_id, autocast, progress)
    except _Overflow:
        if dtype == torch.float32:
            raise InputError("the target's hidden states are not finite: check the target's weights") from None
        log(f"target features: hidden states overflow {dtype}; storing float32 instead", file=sys.stderr)
        cache = build_entry(target, examples, folder, key, torch.float32, batch_size, pad_id, autocast, progress)
    log(f"target features: cached in {cache.folder} ({cache.meta['tokens']} tokens, {cache.meta['dtype']})")
    return cache


def remove_entry(folder: str, key: str) -> None:
    shutil.rmtree(os.path.join(folder, key), ignore_errors=True)


class TargetProbs:
    """The frozen target's distribution (B, T, V) from its hidden states, or over a draft vocabulary d2t
    (B, T, N) renormalised (losses.target_probs), in a buffer reused by every micro-batch: a fresh
    vocabulary-sized tensor per step is paged in by the kernel again each time (the minor page faults of
    issue 14). With d2t only the lm_head's N rows are multiplied: softmax over the N logits is the target's
    distribution restricted and renormalised, 6x fewer products than all 49,152 rows on SmolLM2.

    Only the rows the loss reads are computed: row t of a sequence is the target's prediction of token
    t+1, which the loss reads only when t+1 is a label of some head (t+1 >= 2 and in the loss mask). The
    other rows keep whatever finite values an earlier batch left there; the loss multiplies them by zero."""

    def __init__(self, target, d2t: torch.Tensor | None = None):
        self.target, self.d2t, self.buffer = target, d2t, None
        self.draft_head: tuple | None = None  # (the lm_head rows at d2t, their bias or None)

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = hidden.shape
        V = self.target.vocab_size if self.d2t is None else self.d2t.numel()
        if self.buffer is None or self.buffer.shape[0] < B * T or self.buffer.device != hidden.device:
            # Zeros: finite, so unread rows can never turn a masked-out loss term into NaN.
            self.buffer = torch.zeros(B * T, V, device=hidden.device)
        flat = self.buffer[: B * T]
        need = torch.zeros(B, T, dtype=torch.bool, device=hidden.device)
        need[:, 1 : T - 1] = loss_mask[:, 2:].bool()
        rows = need.flatten().nonzero().squeeze(1)
        if len(rows):
            x = hidden.flatten(0, 1)[rows].to(self.target.dtype)
            logits = self.target.logits(x) if self.d2t is None else self._draft_logits(x)  # (n, V) float32
            torch._softmax(logits, -1, False, out=logits)  # in place: no second (n, V) tensor
            flat.index_copy_(0, rows, logits)
        return flat.view(B, T, V)

    def _draft_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The target's logits at the d2t columns, scaled and soft-capped as TargetModel.logits does."""
        if self.draft_head is None:
            head, d2t = self.target.lm_head, self.d2t.to(x.device)
            bias = getattr(head, "bias", None)
            self.draft_head = (head.weight[d2t].contiguous(), None if bias is None else bias[d2t])
        return self.target.logits(x, weight=self.draft_head)
