"""Trained parameters of each drafter for a Vicuna-7B-shaped target, counted from the real modules.

    python scripts/param_counts.py

Everything is built on the `meta` device: no memory, no weights, no download.
"""

from __future__ import annotations

import torch
import transformers as T

import amphista

VICUNA_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
)

ROWS = [
    ("Medusa, K=5", amphista.MedusaDrafter, {"num_heads": 5}),
    ("Medusa, K=4", amphista.MedusaDrafter, {"num_heads": 4}),
    ("Amphista defaults (K=4, 2 SAL stages, 1 AEB layer)", amphista.AmphistaDrafter, {}),
    ("Amphista, shared lm_head", amphista.AmphistaDrafter, {"shared_lm_head": True}),
    ("Amphista, no AEB (Medusa + SAL)", amphista.AmphistaDrafter, {"aeb_layers": 0}),
    ("Amphista, no SAL (Medusa + AEB)", amphista.AmphistaDrafter, {"use_sal": False}),
    (
        "Amphista, SAL/AEB width 1024, shared lm_head",
        amphista.AmphistaDrafter,
        {"sal_width": 1024, "aeb_width": 1024, "shared_lm_head": True},
    ),
]
PARTS = ("sal", "resblocks", "aeb", "vocab")


def counts(drafter) -> dict[str, int]:
    out = {part: 0 for part in PARTS}
    for name, p in drafter.named_parameters():
        out[name.split(".")[0]] += p.numel()
    out["total"] = sum(out.values())
    return out


def _fmt(n: int) -> str:
    return "-" if not n else f"{n / 1e6:,.1f}M" if n >= 100_000 else f"{n:,}"


def table() -> str:
    with torch.device("meta"):
        target = amphista.TargetModel(T.LlamaForCausalLM(T.LlamaConfig(**VICUNA_7B)))
    lines = [
        "| drafter | SAL | ResBlocks | AEB | vocab heads | total trained |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, cls, over in ROWS:
        c = counts(cls.for_target(target, device="meta", **over))
        cells = " | ".join(_fmt(c[k]) for k in (*PARTS, "total"))
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"Vicuna-7B-shaped target: {VICUNA_7B}")
    print(table())
