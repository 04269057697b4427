"""The llama2.c converter and the bundled stories260K target.

The references here are written from llama2.c's run.c, not from the converter: a NumPy forward with
run.c's interleaved RoPE, and run.c's greedy best-score `encode`. The converted model and tokenizer must
match them exactly (logits to float32 round-off).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from amphista import CheckpointError, InputError, load_default_target
from amphista.bundled import default_target_path
from amphista.cli import main as cli_main
from amphista.convert_llama2c import convert, load_llama2c_model, load_llama2c_tokenizer

DATA = Path(__file__).parent / "data" / "stories260K"
CHECKPOINT, TOKENIZER = DATA / "stories260K.bin", DATA / "tok512.bin"

# karpathy/llama2.c test_all.py: `run stories260K.bin -z tok512.bin -t 0.0 -n 200` (200 tokens after BOS).
LLAMA2C_GOLDEN = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
    "she saw a big, red ball. She wanted to play with it, but it was too high.\nLily's mom said, \"Lily, "
    "let's go to the park.\" Lily was sad and didn't know what to do. She said, \"I want to play with your "
    "ball, but I can't find it.\"\nLily was sad and didn't know what to do. She said, \"I'm sorry, Lily. "
    "I didn't know what to do.\"\nLily didn't want to help her mom, so she"
)
# model.generate(do_sample=False, max_new_tokens=40) after tokenizer("Once upon a time").
PROMPT_GOLDEN = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball."
)

TEXTS = [
    "Once upon a time",
    "Hello, world! It's 3.14159 -- or 22/7? (maybe) [x] {y} #1 @home 50% a+b=c",
    'Lily said: "Let\'s go!"\nTom ran.\n\nThe end.',
    "  two leading spaces, one trailing ",
    "tabs\tand\r\ncarriage returns",
    "café ☃ 日本",
    "naïve résumé — ünïcödé 🙂",
    "x",
]


# ----------------------------------------------------------------------------- run.c, in NumPy


def read_run_c(path):
    """(config dict, weights) laid out as run.c's memory_map_weights reads a v0 checkpoint."""
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = (int(v) for v in np.fromfile(path, "<i4", count=7))
    hs = dim // n_heads
    kv = n_kv * hs
    V = abs(vocab)
    shapes = [
        ("emb", (V, dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv, dim)), ("wv", (n_layers, kv, dim)), ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)), ("freq_real", (seq_len, hs // 2)),
        ("freq_imag", (seq_len, hs // 2)),
    ]  # fmt: skip
    if vocab < 0:
        shapes.append(("wcls", (V, dim)))
    flat = np.fromfile(path, "<f4", offset=28).astype(np.float64)
    w, at = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        w[name] = flat[at : at + n].reshape(shape)
        at += n
    assert at == flat.size
    w.setdefault("wcls", w["emb"])
    return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_size=hs), w


def run_c_logits(cfg, w, tokens) -> np.ndarray:
    """run.c's forward over every position at once (T tokens -> (T, V) logits), in float64."""
    T, hs, nh = len(tokens), cfg["head_size"], cfg["n_heads"]
    kv_mul = nh // cfg["n_kv_heads"]

    def rmsnorm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    def rope(v):  # v (T, n * hs); run.c rotates (v[i], v[i+1]) by pos * 10000^(-(i % hs) / hs)
        i = np.arange(0, v.shape[1], 2)
        angle = np.arange(T)[:, None] * (1.0 / 10000.0 ** ((i % hs) / hs))[None, :]
        cos, sin = np.cos(angle), np.sin(angle)
        out = v.copy()
        out[:, 0::2] = v[:, 0::2] * cos - v[:, 1::2] * sin
        out[:, 1::2] = v[:, 0::2] * sin + v[:, 1::2] * cos
        return out

    causal = np.triu(np.full((T, T), -np.inf), k=1)
    x = w["emb"][tokens]  # (T, d)
    for layer in range(cfg["n_layers"]):
        xb = rmsnorm(x, w["rms_att"][layer])
        q, k, v = rope(xb @ w["wq"][layer].T), rope(xb @ w["wk"][layer].T), xb @ w["wv"][layer].T
        heads = []
        for h in range(nh):
            g = h // kv_mul  # the KV head this query head shares
            qh, kh, vh = q[:, h * hs : (h + 1) * hs], k[:, g * hs : (g + 1) * hs], v[:, g * hs : (g + 1) * hs]
            s = qh @ kh.T / np.sqrt(hs) + causal  # (T, T)
            p = np.exp(s - s.max(-1, keepdims=True))
            heads.append((p / p.sum(-1, keepdims=True)) @ vh)
        x = x + np.concatenate(heads, axis=1) @ w["wo"][layer].T
        xb = rmsnorm(x, w["rms_ffn"][layer])
        a, b = xb @ w["w1"][layer].T, xb @ w["w3"][layer].T
        x = x + (a / (1 + np.exp(-a)) * b) @ w["w2"][layer].T
    return rmsnorm(x, w["rms_final"]) @ w["wcls"].T


def read_run_c_tokenizer(path, vocab_size=512):
    data = Path(path).read_bytes()
    pieces, scores, at = [], [], 4
    for _ in range(vocab_size):
        score, n = struct.unpack_from("<fi", data, at)
        pieces.append(data[at + 8 : at + 8 + n])
        scores.append(score)
        at += 8 + n
    return pieces, scores


def run_c_encode(pieces, scores, text: str) -> list[int]:
    """run.c's encode(text, bos=1, eos=0): dummy-prefix space, code points or their bytes (+3), then
    repeatedly merge the adjacent pair whose concatenation scores highest (leftmost on ties)."""
    lookup = {p: i for i, p in enumerate(pieces)}
    tokens = [1]
    if text:
        tokens.append(lookup[b" "])
    for ch in text:
        b = ch.encode()
        tokens.extend([lookup[b]] if b in lookup else [byte + 3 for byte in b])
    while True:
        best = (-1e10, -1, -1)  # (score, id, index)
        for i in range(len(tokens) - 1):
            j = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]], -1)
            if j != -1 and scores[j] > best[0]:
                best = (scores[j], j, i)
        if best[2] == -1:
            return tokens
        tokens[best[2] : best[2] + 2] = [best[1]]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def target():
    return load_default_target()


@pytest.fixture(scope="module", params=["bundled", "converted"])
def tok(request, target):
    """The shipped tokenizer and one converted now from tok512.bin."""
    return target.tokenizer if request.param == "bundled" else load_llama2c_tokenizer(TOKENIZER, 512)


@pytest.fixture(scope="module")
def run_c_tok():
    return read_run_c_tokenizer(TOKENIZER)


def write_random_checkpoint(path, *, dim=32, hidden=72, n_layers=2, n_heads=4, n_kv=2, vocab=50, seq_len=64):
    """A llama2.c v0 checkpoint with random weights and a separate classifier (negative vocab size)."""
    rng = np.random.default_rng(0)
    hs, kv, L = dim // n_heads, n_kv * dim // n_heads, n_layers

    def gain(*shape):  # RMSNorm weights near 1
        return 1.0 + 0.1 * rng.standard_normal(shape)

    def proj(*shape):  # large enough that attention is far from uniform and RoPE matters
        return 0.5 * rng.standard_normal(shape)

    angle = np.arange(seq_len)[:, None] / 10000.0 ** (np.arange(0, hs, 2) / hs)[None, :]
    tensors = [
        proj(vocab, dim), gain(L, dim), proj(L, dim, dim), proj(L, kv, dim), proj(L, kv, dim), proj(L, dim, dim),
        gain(L, dim), proj(L, hidden, dim), proj(L, dim, hidden), proj(L, hidden, dim), gain(dim),
        np.cos(angle), np.sin(angle), rng.standard_normal((vocab, dim)),
    ]  # fmt: skip
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, n_layers, n_heads, n_kv, -vocab, seq_len))
        for t in tensors:
            t.astype("<f4").tofile(f)
    return path


# ----------------------------------------------------------------------------- model


def test_bundled_logits_equal_run_c(target):
    cfg, w = read_run_c(CHECKPOINT)
    tokens = [1, 403, 407, 261, 378, 11, 500, 300, 42, 13, 7, 259, 480, 290] + list(range(20, 60, 3))
    ref = run_c_logits(cfg, w, tokens)
    with torch.no_grad():
        got = target.model(torch.tensor([tokens])).logits[0].double().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_random_untied_gqa_checkpoint_logits_equal_run_c(tmp_path):
    path = write_random_checkpoint(tmp_path / "random.bin")
    cfg, w = read_run_c(path)
    model = load_llama2c_model(path)
    assert not model.config.tie_word_embeddings
    assert model.config.num_key_value_heads == 2 < model.config.num_attention_heads
    model.save_pretrained(tmp_path / "hf")
    reloaded = type(model).from_pretrained(tmp_path / "hf")
    tokens = np.random.default_rng(1).integers(0, 50, size=40).tolist()
    ref = run_c_logits(cfg, w, tokens)
    for m in (model, reloaded):
        with torch.no_grad():
            got = m(torch.tensor([tokens])).logits[0].double().numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_bundled_config(target):
    c = target.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 172, 5)
    assert (c.num_attention_heads, c.num_key_value_heads) == (8, 4)
    assert (c.vocab_size, c.max_position_embeddings) == (512, 512)
    assert c.tie_word_embeddings and c.rms_norm_eps == 1e-5 and c.rope_parameters["rope_theta"] == 10000.0
    # TinyStories separates stories with BOS and never saw EOS; run.c stops on BOS, and so do we.
    assert sorted(target.eos_token_ids()) == [1, 2]
    assert target.model.generation_config.bos_token_id == 1


# ----------------------------------------------------------------------------- tokenizer


def test_token_ids_equal_run_c_encode(tok, run_c_tok):
    pieces, scores = run_c_tok
    for text in TEXTS + [""]:
        assert tok(text).input_ids == run_c_encode(pieces, scores, text), text
    # Random strings over letters, digits, punctuation, whitespace and multi-byte characters.
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'\"-:;()\n\té☃日")
    for _ in range(150):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 30))))
        assert tok(text).input_ids == run_c_encode(pieces, scores, text), repr(text)


def test_tokenizer_round_trip_and_specials(tok):
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id == 1
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("café ☃ 日本", add_special_tokens=False).input_ids[0] != 1
    assert "<0xE2>" in tok.convert_ids_to_tokens(tok("☃").input_ids)  # byte fallback, not <unk>
    assert (tok.unk_token_id, tok.eos_token_id) == (0, 2)


# ----------------------------------------------------------------------------- golden text


def test_reproduces_llama2c_golden_text(target):
    out = target.model.generate(torch.tensor([[1]]), do_sample=False, max_new_tokens=200, eos_token_id=None)
    assert out.shape[1] == 201
    assert target.tokenizer.decode(out[0], skip_special_tokens=True) == LLAMA2C_GOLDEN


def test_prompt_golden_text(target):
    enc = target.tokenizer("Once upon a time", return_tensors="pt")
    out = target.model.generate(**enc, do_sample=False, max_new_tokens=40)
    assert target.tokenizer.decode(out[0], skip_special_tokens=True) == PROMPT_GOLDEN


# ----------------------------------------------------------------------------- CLI and bad input


# Fields `transformers` writes for its own bookkeeping: they follow the installed release, not our converter.
BOOKKEEPING = {"transformers_version", "_commit_hash", "_name_or_path"}


def _settings(path):
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in BOOKKEEPING}


def test_cli_reproduces_bundled_model(tmp_path):
    out = tmp_path / "stories260K"
    argv = ["convert-llama2c", "--checkpoint", str(CHECKPOINT), "--tokenizer", str(TOKENIZER)]
    argv += ["--out", str(out)]
    assert cli_main(argv) == 0
    bundled = default_target_path()
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert _settings(out / name) == _settings(bundled / name), name
    got, want = load_file(out / "model.safetensors"), load_file(bundled / "model.safetensors")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tok) == 512
    assert not list(tmp_path.glob(".stories260K.*"))  # no temporary directory left behind

    assert cli_main(argv) == 2  # exists: needs --force
    with pytest.raises(InputError, match="--force"):
        convert(CHECKPOINT, TOKENIZER, out)
    assert cli_main(argv + ["--force"]) == 0 and (out / "model.safetensors").is_file()


def test_bad_checkpoints_raise_checkpoint_error(tmp_path, capsys):
    raw = CHECKPOINT.read_bytes()
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(raw[: len(raw) // 2])
    argv = ["convert-llama2c", "--checkpoint", str(truncated), "--tokenizer", str(TOKENIZER), "--out"]
    assert cli_main(argv + [str(tmp_path / "out")]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="truncated"):
        load_llama2c_model(truncated)

    with pytest.raises(CheckpointError, match="does not exist"):
        load_llama2c_model(tmp_path / "missing.bin")
    bad_header = tmp_path / "bad_header.bin"
    bad_header.write_bytes(struct.pack("<7i", 64, 172, 5, 0, 4, 512, 512) + raw[28:])
    with pytest.raises(CheckpointError, match="invalid header"):
        load_llama2c_model(bad_header)
    versioned = tmp_path / "v1.bin"
    versioned.write_bytes(struct.pack("<i", 0x616B3432) + raw[4:])
    with pytest.raises(CheckpointError, match="version 0"):
        load_llama2c_model(versioned)
    with pytest.raises(CheckpointError, match="trailing"):
        (tmp_path / "long.bin").write_bytes(raw + b"\0" * 8)
        load_llama2c_model(tmp_path / "long.bin")

    with pytest.raises(CheckpointError, match="ends after"):
        load_llama2c_tokenizer(TOKENIZER, 1000)  # a tokenizer for a smaller vocabulary than the model's
    with pytest.raises(CheckpointError, match="after the checkpoint's"):
        load_llama2c_tokenizer(TOKENIZER, 300)
