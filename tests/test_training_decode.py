"""Training and decoding agree on what each head predicts: a drafter trained on the target's own greedy
output must be accepted by the decode loop far more often than an untrained one (an off-by-one shift
between the loss labels and the decoder's use of the heads would leave tau near 1)."""

from __future__ import annotations

import json

import torch
from test_training_helpers import config, tiny_target

import amphista
from amphista.training import train


def test_trained_drafter_is_accepted_by_the_decoder(tmp_path):
    target = tiny_target()
    g = torch.Generator().manual_seed(0)
    prompts = torch.cat([torch.ones(8, 1, dtype=torch.long), torch.randint(3, 512, (8, 4), generator=g)], 1)
    out = target.model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                max_new_tokens=40, pad_token_id=0, eos_token_id=None)  # fmt: skip
    data = tmp_path / "self_distilled.jsonl"  # token ids: exact, no decode/encode round trip
    data.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in out.tolist()))
    cfg = config(tmp_path, [str(data)], drafter="medusa", max_steps=25, batch_size=8, eval_fraction=0.0,
                 lr=2e-2, warmup_ratio=0.0, log_every=5)  # fmt: skip
    train(cfg, target=target)

    prompt = prompts[0].tolist()
    reference = amphista.vanilla_generate(target, prompt, max_new_tokens=40).new_tokens
    trained = amphista.SpeculativeDecoder(target, amphista.load_drafter(cfg.out, target), tree="chain")
    untrained = amphista.SpeculativeDecoder(target, amphista.MedusaDrafter.for_target(target), tree="chain")
    got = trained.generate(prompt, max_new_tokens=40)
    base = untrained.generate(prompt, max_new_tokens=40)
    assert got.new_tokens == reference  # lossless, whatever the drafter
    assert got.tau > base.tau + 0.4, (got.tau, base.tau)  # observed 1.82 vs 1.21
