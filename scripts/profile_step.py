"""Per-step cost of the speculative loop beyond the target forward, on the bundled model.

    python scripts/profile_step.py [--tree mc_sim_7b_63] [--tokens 200]

Runs the loop with a stand-in drafter that costs almost nothing, times the target's tree forward alone
on the same shapes, and prints the difference: what the loop itself (drafting glue, masks, verification,
cache compaction, bookkeeping) costs per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import amphista
from amphista.decoder import TreeMask
from amphista.drafters import OracleDrafter
from amphista.kv_cache import TreeCache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default="mc_sim_7b_63")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = amphista.load_default_target()
    prompt = target.tokenizer("Once upon a time")["input_ids"]
    ref = amphista.vanilla_generate(target, prompt, max_new_tokens=args.tokens, eos_token_id=[])
    drafter = OracleDrafter(ref.sequences[0].tolist(), target.vocab_size, target.hidden_size, 4, error_rate=0.3)
    dec = amphista.SpeculativeDecoder(target, drafter, tree=args.tree)
    for _ in range(2):
        out = dec.generate(prompt, max_new_tokens=args.tokens, eos_token_id=[])
    steps = out.step_times[1:]

    # The target's tree forward alone, same shapes, same cache length range.
    buf, n = dec.buffers, dec.buffers.num_nodes
    cache = TreeCache(target.num_layers, len(prompt) + args.tokens + n)
    target.forward(torch.tensor([prompt]), cache=cache)
    mask = TreeMask(buf, cache.max_len, target.dtype, "cpu", None, None)
    tokens = torch.randint(3, target.vocab_size, (1, n))
    fwd = []
    with torch.inference_mode():
        for _ in range(len(steps)):
            start = cache.length
            t = time.perf_counter()
            target.forward(tokens, position_ids=(start + buf.depth)[None], attention_mask=mask(start), cache=cache)
            fwd.append(time.perf_counter() - t)
            cache.commit(start, torch.arange(2), [0, 1])
    one = []
    cache.truncate(len(prompt))
    with torch.inference_mode():
        for _ in range(50):
            t = time.perf_counter()
            target.forward(tokens[:, :1], position_ids=torch.tensor([[cache.length]]), cache=cache)
            one.append(time.perf_counter() - t)
    drafter_ms = []
    h = torch.zeros(1, 3, target.hidden_size)
    for _ in range(50):
        t = time.perf_counter()
        drafter.draft(h, torch.zeros(1, 3, dtype=torch.long), 10)
        drafter_ms.append(time.perf_counter() - t)

    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    print(f"tree: {args.tree} ({n} tokens/step), tau {out.tau:.2f}, threads {args.threads}")
    print(f"target forward, 1 token:        {med(one):.3f} ms")
    print(f"target forward, {n} tree tokens: {med(fwd):.3f} ms")
    print(f"stand-in drafter call:          {med(drafter_ms):.3f} ms")
    print(f"full speculative step:          {med(steps):.3f} ms")
    print(f"loop overhead per step:         {med(steps) - med(fwd) - med(drafter_ms):.3f} ms")


if __name__ == "__main__":
    main()
