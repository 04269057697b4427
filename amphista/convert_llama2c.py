"""Convert a llama2.c checkpoint and tokenizer into a Hugging Face Llama directory.

llama2.c (karpathy) writes a "v0" checkpoint as a 7 x int32 header followed by float32 tensors in a fixed
order, and a tokenizer as (score, bytes) pairs that its run.c merges greedily by score. Here both become a
`LlamaForCausalLM` and a `PreTrainedTokenizerFast` whose logits and token ids equal run.c's.

Two conventions differ between the formats and are converted, not copied:
- RoPE: run.c rotates interleaved pairs (0,1), (2,3), ... of each head; Hugging Face's `rotate_half` pairs
  i with i + head_size/2. Permuting the rows of wq and wk per head makes both compute the same scores.
- Dummy prefix: run.c prepends one space to every non-empty text, even one that already starts with a
  space. `Metaspace(prepend_scheme="first")` skips the prefix in that case, so a `Prepend` normalizer is
  used instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError, InputError
from .files import default_permissions

HEADER = struct.Struct("<7i")
# llama2.c's versioned exports (export.py --version 1, 2) start with this magic; their layout differs.
VERSIONED_MAGIC = 0x616B3432  # "ak42"
SPIECE_UNDERLINE = "\u2581"  # SentencePiece's visible space
UNK, BOS, EOS = 0, 1, 2  # hard-coded in run.c, as is byte b at id b + 3
SPECIAL_NAMES = ("<unk>", "<s>", "</s>")
ROPE_THETA = 10000.0  # run.c computes RoPE with this base and ignores the tables stored in the checkpoint
RMS_NORM_EPS = 1e-5  # run.c's rmsnorm


@dataclass(frozen=True)
class Llama2cConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """The on-disk order of run.c's `memory_map_weights`; matrices are (out, in) like nn.Linear."""
        L, d, h, V, hs = self.n_layers, self.dim, self.hidden_dim, self.vocab_size, self.head_size
        kv = self.n_kv_heads * hs
        shapes = [
            ("token_embedding_table", (V, d)),
            ("rms_att_weight", (L, d)),
            ("wq", (L, d, d)),
            ("wk", (L, kv, d)),
            ("wv", (L, kv, d)),
            ("wo", (L, d, d)),
            ("rms_ffn_weight", (L, d)),
            ("w1", (L, h, d)),
            ("w2", (L, d, h)),
            ("w3", (L, h, d)),
            ("rms_final_weight", (d,)),
            ("freq_cis_real", (self.seq_len, hs // 2)),
            ("freq_cis_imag", (self.seq_len, hs // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("wcls", (V, d)))
        return shapes

    def file_size(self) -> int:
        return HEADER.size + 4 * sum(int(np.prod(shape)) for _, shape in self.tensor_shapes())


def _open_error(path: Path, what: str) -> CheckpointError | None:
    if not path.exists():
        return CheckpointError(f"{what} {str(path)!r} does not exist: check the path")
    if not path.is_file():
        return CheckpointError(f"{what} {str(path)!r} is not a file: pass the llama2.c .bin file itself")
    return None


def read_header(path: str | os.PathLike) -> Llama2cConfig:
    path = Path(path)
    if err := _open_error(path, "checkpoint"):
        raise err
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is {len(raw)} bytes, shorter than llama2.c's 28-byte header: "
            "the file is truncated or not a llama2.c checkpoint"
        )
    fields = HEADER.unpack(raw)
    if fields[0] == VERSIONED_MAGIC:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a versioned llama2.c export (magic 'ak42'); only the legacy v0 "
            "layout is supported: export the PyTorch checkpoint again with llama2.c's "
            "`export.py --version 0 --checkpoint model.pt out.bin`"
        )
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, seq_len = fields
    # A negative vocab size is llama2.c's flag for a separate classifier matrix after the RoPE tables.
    cfg = Llama2cConfig(dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len, vocab > 0)
    problems = []
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, cfg.vocab_size, seq_len) <= 0:
        problems.append("a size is zero or negative")
    elif dim % n_heads or n_heads % n_kv_heads or cfg.head_size % 2:
        problems.append("dim must split into n_heads heads of even size, n_heads into n_kv_heads groups")
    if problems:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has an invalid header (dim={dim}, hidden_dim={hidden_dim}, "
            f"n_layers={n_layers}, n_heads={n_heads}, n_kv_heads={n_kv_heads}, vocab_size={vocab}, "
            f"seq_len={seq_len}): {problems[0]}; the file is corrupt or not a llama2.c v0 checkpoint"
        )
    return cfg


def read_checkpoint(path: str | os.PathLike) -> tuple[Llama2cConfig, dict[str, np.ndarray]]:
    """Header and every tensor of a llama2.c v0 checkpoint, by llama2.c's names, as float32 arrays."""
    cfg = read_header(path)
    size, expected = os.path.getsize(path), cfg.file_size()
    if size != expected:
        hint = (
            "the file is truncated: copy or download it again"
            if size < expected
            else "the file has trailing data: it is corrupt or not a llama2.c v0 checkpoint"
        )
        raise CheckpointError(
            f"checkpoint {str(path)!r} is {size} bytes but its header (dim={cfg.dim}, n_layers={cfg.n_layers}, "
            f"vocab_size={cfg.vocab_size}, shared classifier={cfg.shared_classifier}) implies {expected}: {hint}"
        )
    flat = np.fromfile(path, dtype="<f4", offset=HEADER.size)
    weights, at = {}, 0
    for name, shape in cfg.tensor_shapes():
        n = int(np.prod(shape))
        weights[name] = flat[at : at + n].reshape(shape)
        at += n
    if not all(np.isfinite(w).all() for w in weights.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} holds NaN or infinite weights: the file is corrupt")
    return cfg, weights


def interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the output rows of a q or k projection, (n_heads * hs, d), from run.c's interleaved RoPE
    pairs (2j, 2j+1) to Hugging Face's halves (j, j + hs/2): new row j <- old 2j, new j + hs/2 <- old 2j+1."""
    rows, d = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, d).transpose(0, 2, 1, 3).reshape(rows, d)


def hf_config(cfg: Llama2cConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_size,
        max_position_embeddings=cfg.seq_len,
        hidden_act="silu",
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=cfg.shared_classifier,
        bos_token_id=BOS,
        eos_token_id=EOS,
        dtype="float32",
    )


def load_llama2c_model(path: str | os.PathLike):
    """A llama2.c v0 checkpoint as an eval-mode float32 `LlamaForCausalLM`."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    cfg, w = read_checkpoint(path)
    sd = {"model.embed_tokens.weight": w["token_embedding_table"], "model.norm.weight": w["rms_final_weight"]}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = w["rms_att_weight"][i]
        sd[p + "self_attn.q_proj.weight"] = interleaved_to_half(w["wq"][i], cfg.n_heads)
        sd[p + "self_attn.k_proj.weight"] = interleaved_to_half(w["wk"][i], cfg.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = w["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = w["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = w["rms_ffn_weight"][i]
        sd[p + "mlp.gate_proj.weight"] = w["w1"][i]
        sd[p + "mlp.down_proj.weight"] = w["w2"][i]
        sd[p + "mlp.up_proj.weight"] = w["w3"][i]
    sd["lm_head.weight"] = w["token_embedding_table"] if cfg.shared_classifier else w["wcls"]

    model = LlamaForCausalLM(hf_config(cfg))
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)
    # run.c stops when the model predicts BOS: llama2.c trains on BOS-separated documents without EOS, so
    # a story ends with BOS. Generation stops at either.
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=[EOS, BOS], pad_token_id=EOS)
    return model.eval()


def read_tokenizer(path: str | os.PathLike, vocab_size: int) -> tuple[list[bytes], list[float]]:
    """The pieces (raw bytes, with spaces as ' ') and merge scores of a llama2.c tokenizer.bin.

    The file does not record its own vocabulary size; llama2.c takes it from the checkpoint, and so do we.
    """
    path = Path(path)
    if err := _open_error(path, "tokenizer"):
        raise err
    data = path.read_bytes()
    fix = "pass the tokenizer.bin this checkpoint was trained with"
    if len(data) < 4:
        raise CheckpointError(f"tokenizer {str(path)!r} is truncated ({len(data)} bytes): {fix}")
    (max_len,) = struct.unpack_from("<i", data, 0)
    pieces, scores, at = [], [], 4
    for i in range(vocab_size):
        if at + 8 > len(data):
            raise CheckpointError(
                f"tokenizer {str(path)!r} ends after {i} of the checkpoint's {vocab_size} tokens: "
                f"it is truncated or belongs to another model; {fix}"
            )
        score, n = struct.unpack_from("<fi", data, at)
        if not 0 <= n <= max_len or at + 8 + n > len(data):
            raise CheckpointError(f"tokenizer {str(path)!r} is corrupt at token {i} (length {n}): {fix}")
        pieces.append(data[at + 8 : at + 8 + n])
        scores.append(score)
        at += 8 + n
    if at != len(data):
        raise CheckpointError(
            f"tokenizer {str(path)!r} has {len(data) - at} bytes after the checkpoint's {vocab_size} tokens: "
            f"it holds a larger vocabulary than the model; {fix}"
        )
    return pieces, scores


def _bpe_merges(names: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) pair whose concatenation is a piece, ranked as run.c applies them.

    run.c repeatedly merges the adjacent pair whose concatenation has the highest score (leftmost on
    ties). A BPE model applies the lowest-ranked merge first, so ranks follow descending score; splits of
    one piece share its score and are ordered by (left id, right id) as transformers' SentencePiece
    converter does.
    """
    merges = []
    for i in sorted(range(len(names)), key=lambda i: (-scores[i], i)):
        if i in (UNK, BOS, EOS):
            continue
        piece, local = names[i], []
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if vocab.get(left, UNK) > EOS and vocab.get(right, UNK) > EOS:
                local.append((vocab[left], vocab[right], left, right))
        merges.extend((left, right) for _, _, left, right in sorted(local))
    return merges


def load_llama2c_tokenizer(path: str | os.PathLike, vocab_size: int):
    """A llama2.c tokenizer.bin as a `PreTrainedTokenizerFast` giving run.c's `encode(text, bos=1, eos=0)`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces, scores = read_tokenizer(path, vocab_size)
    fix = "pass a llama2.c tokenizer.bin (SentencePiece BPE with byte fallback)"
    if vocab_size < 3 + 256 or any(pieces[3 + b] != f"<0x{b:02X}>".encode() for b in range(256)):
        raise InputError(
            f"tokenizer {str(path)!r} lacks run.c's byte tokens <0x00>..<0xFF> at ids 3..258: {fix}"
        )
    try:
        names = [p.decode("utf-8").replace(" ", SPIECE_UNDERLINE) for p in pieces]
    except UnicodeDecodeError as e:
        raise CheckpointError(f"tokenizer {str(path)!r} has a piece that is not UTF-8 ({e}): {fix}") from e
    # llama2.c's export writes BOS and EOS as "\n<s>\n" and "\n</s>\n" so that run.c prints them on a line.
    names[UNK], names[BOS], names[EOS] = SPECIAL_NAMES
    vocab = {name: i for i, name in enumerate(names)}
    if len(vocab) != len(names):
        raise CheckpointError(f"tokenizer {str(path)!r} repeats a piece: {fix}")

    bpe = models.BPE(
        vocab, _bpe_merges(names, scores, vocab), unk_token="<unk>", fuse_unk=True, byte_fallback=True
    )
    tok = Tokenizer(bpe)
    # Prepend is skipped on empty text, like run.c's dummy prefix; see the module docstring on Metaspace.
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPIECE_UNDERLINE), normalizers.Replace(" ", SPIECE_UNDERLINE)]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_NAMES])
    # Strip one leading space: the dummy prefix, as run.c's decode does after BOS.
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPIECE_UNDERLINE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=None,
    )


def convert(
    checkpoint: str | os.PathLike,
    tokenizer: str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Write the Hugging Face directory `out` (config, weights, tokenizer, generation config) atomically."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"output {str(out)!r} already exists: choose another --out or pass --force")
    model = load_llama2c_model(checkpoint)
    tok = load_llama2c_tokenizer(tokenizer, model.config.vocab_size)
    tok.model_max_length = model.config.max_position_embeddings

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        default_permissions(tmp)  # mkdtemp and safetensors create owner-only files
        if out.exists():
            # Swap in two renames so that `out` is never half-written; the old copy goes last.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _run(args: argparse.Namespace) -> int:
    out = convert(args.checkpoint, args.tokenizer, args.out, overwrite=args.force)
    print(f"wrote {out}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-llama2c",
        help="convert a llama2.c checkpoint + tokenizer.bin into a Hugging Face Llama directory",
        description="Convert a llama2.c v0 checkpoint (model.bin) and its tokenizer.bin into a Hugging Face "
        "LlamaForCausalLM directory: config.json, model.safetensors, tokenizer and generation config.",
    )
    p.add_argument("--checkpoint", required=True, help="llama2.c v0 checkpoint, e.g. stories260K.bin")
    p.add_argument("--tokenizer", required=True, help="llama2.c tokenizer, e.g. tok512.bin")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--force", action="store_true", help="replace --out if it already exists")
    p.set_defaults(func=_run)
