"""Shared pieces of the training tests: a tiny target with the bundled tokenizer, synthetic data."""

from __future__ import annotations

import json
import random

import torch
import transformers as T

from amphista.bundled import default_target_path
from amphista.target import TargetModel
from amphista.training import TrainConfig

CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tokenizer():
    """The bundled stories260K tokenizer (vocabulary 512, no chat template): in the package, no download."""
    return T.AutoTokenizer.from_pretrained(default_target_path())


def tiny_target(seed: int = 0) -> TargetModel:
    """A random 2-layer Llama over the bundled tokenizer's 512 tokens, with peaky distributions."""
    cfg = T.LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    return TargetModel(model.eval(), tokenizer())


def save_target(path) -> str:
    target = tiny_target()
    target.model.save_pretrained(path)
    target.tokenizer.save_pretrained(path)
    return str(path)


NAMES, ANIMALS, PLACES = ["Tom", "Lily", "Sam", "Mia"], ["cat", "dog", "bird", "fish"], ["park", "house", "garden"]


def story(rng: random.Random) -> str:
    n, a, p = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES)
    return (
        f"Once upon a time, {n} had a little {a}. Every day {n} and the {a} went to the {p}. "
        f"The {a} was happy in the {p}, and {n} was happy too. The end."
    )


def write_stories(path, n: int = 64, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "text": story(rng)}) + "\n")
    return str(path)


def write_chats(path, n: int = 32, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            name = rng.choice(NAMES)
            conv = [{"from": "human", "value": f"Tell me about {name}."}, {"from": "gpt", "value": story(rng)}]
            f.write(json.dumps({"conversations": conv}) + "\n")
    return str(path)


def config(tmp_path, data: list[str], **kw) -> TrainConfig:
    base = dict(
        data=data, out=str(tmp_path / "out"), drafter="medusa", batch_size=4, max_steps=6, seq_len=64,
        log_every=1, save_every=0, eval_fraction=0.1, progress=False, seed=0,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)
