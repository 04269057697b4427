"""Tiny targets built in code (no downloads) shared by the tests."""

from __future__ import annotations

import pytest
import torch
import transformers as T

torch.set_num_threads(1)

ARCHS = ("llama", "mistral", "mistral_sw", "qwen2", "qwen3", "gemma2")


def tiny_target(arch: str = "llama", vocab: int = 97, seed: int = 0, max_pos: int = 256, dtype=torch.float32,
                sharpen: float = 1.0):
    """A random causal LM of the given family: 2 layers, GQA (4 query heads, 2 KV heads)."""
    common = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_pos, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if arch == "llama":
        cfg, cls = T.LlamaConfig(**common), T.LlamaForCausalLM
    elif arch == "mistral":
        cfg, cls = T.MistralConfig(**common, sliding_window=None), T.MistralForCausalLM
    elif arch == "mistral_sw":  # every layer slides over 16 positions
        cfg, cls = T.MistralConfig(**common, sliding_window=16), T.MistralForCausalLM
    elif arch == "qwen2":
        cfg, cls = T.Qwen2Config(**common), T.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg, cls = T.Qwen3Config(**common, head_dim=8), T.Qwen3ForCausalLM
    elif arch == "gemma2":
        cfg = T.Gemma2Config(**common, head_dim=8, sliding_window=16, query_pre_attn_scalar=8)
        cls = T.Gemma2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg)
    if sharpen != 1.0:  # peakier next-token distributions than random init gives
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(sharpen)
    return model.to(dtype).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0].tolist()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    # Converted GGUF models and training features go to a cache folder of the test session's own, never
    # the user's ~/.cache/amphista.
    monkeypatch.setenv("AMPHISTA_CACHE", str(tmp_path_factory.getbasetemp() / "amphista-cache"))


@pytest.fixture(scope="session")
def llama():
    return tiny_target("llama")
