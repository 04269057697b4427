"""What only a GPU shows: a Vicuna-7B-shaped target (random weights, bf16) under the speculative loop.

    python scripts/gpu_7b.py [--tokens 128] [--out results.json]

Random weights mean no trained drafter can predict the target, so the drafter here is the stand-in
OracleDrafter with a fixed error rate: it isolates what the loop costs and gains at a given acceptance.
Reports: target forward latency for 1 token vs a 64-token tree, the drafters' own cost at this shape,
tokens/s of vanilla (ours and HF generate) and of the speculative loop, and greedy exactness.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers as T

import amphista
from amphista.decoder import TreeMask
from amphista.drafters import OracleDrafter
from amphista.kv_cache import TreeCache


def timed(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", default="gpu_7b.json")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sharpen", type=float, default=8.0,
                    help="scale the random lm_head so next-token margins look like a trained model's")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    cfg = T.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = T.LlamaForCausalLM(cfg).to(dtype).eval()
        model.get_output_embeddings().weight.data.mul_(args.sharpen)
        # Clocks idle low: run the GPU for a few seconds before anything is timed.
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        t = time.perf_counter()
        while time.perf_counter() - t < 3:
            a @ a
        torch.cuda.synchronize()
    model.config._attn_implementation = "sdpa"
    target = amphista.TargetModel(model)
    report = {"dtype": args.dtype, "sharpen": args.sharpen, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": T.__version__}

    # Forward latency at a 256-token context: 1 token vs the 64-token tree.
    buf = amphista.tree.TreeBuffers(amphista.TreeSpec.load("mc_sim_7b_63"), "cuda")
    cache = TreeCache(target.num_layers, 256 + 64 + 1)
    with torch.inference_mode():
        target.forward(torch.randint(0, 32000, (1, 256), device="cuda"), cache=cache)
    mask = TreeMask(buf, cache.max_len, dtype, "cuda", None, None)
    tree_tokens = torch.randint(0, 32000, (1, 64), device="cuda")

    def fwd(n):
        def run():
            cache.truncate(256)
            if n == 1:
                target.forward(tree_tokens[:, :1], position_ids=torch.tensor([[256]], device="cuda"), cache=cache)
            else:
                target.forward(tree_tokens, position_ids=(256 + buf.depth)[None], attention_mask=mask(256), cache=cache)
        return run

    report["forward_ms"] = {"1_token": timed(fwd(1)), "64_tree_tokens": timed(fwd(64))}
    print("forward ms", report["forward_ms"], flush=True)

    # Drafter costs at this shape (one incremental call after a 256-token prefill).
    report["drafter_ms"] = {}
    for name in ("MedusaDrafter", "AmphistaDrafter"):
        cls = getattr(amphista, name, None)
        if cls is None:
            continue
        drafter = cls.for_target(target).to("cuda", dtype).eval()
        drafter.reset(512)
        h = torch.randn(1, 256, 4096, device="cuda", dtype=dtype)
        x = torch.randint(0, 32000, (1, 256), device="cuda")
        with torch.inference_mode():
            drafter.draft(h, x, 0)
            pos = [256]

            def step(drafter=drafter, pos=pos, h=h, x=x):
                drafter.draft(h[:, :3], x[:, :3], pos[0])
                pos[0] += 3
            report["drafter_ms"][name] = timed(step, reps=20)
        print(name, report["drafter_ms"][name], flush=True)
        del drafter

    prompt = torch.randint(0, 32000, (1, 128)).tolist()[0]
    runs = {}
    van = amphista.VanillaDecoder(target)
    van.generate(prompt, max_new_tokens=8, eos_token_id=[])
    t = time.perf_counter()
    ref = van.generate(prompt, max_new_tokens=args.tokens, eos_token_id=[])
    runs["vanilla (ours)"] = {"tokens_per_s": args.tokens / (time.perf_counter() - t), "tau": 1.0}
    ids = torch.tensor([prompt], device="cuda")
    model.generate(ids, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    torch.cuda.synchronize()
    t = time.perf_counter()
    hf = model.generate(ids, do_sample=False, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    torch.cuda.synchronize()
    runs["vanilla (HF generate)"] = {"tokens_per_s": args.tokens / (time.perf_counter() - t), "tau": 1.0,
                                      "equals_ours": hf[0].tolist() == ref.sequences[0].tolist()}
    base = max(r["tokens_per_s"] for r in runs.values())
    for tree in ("chain", "mc_sim_7b_63"):
        for err in (0.0, 0.2, 0.4):
            drafter = OracleDrafter(ref.sequences[0].tolist(), 32000, 4096, 4, error_rate=err, seed=1)
            dec = amphista.SpeculativeDecoder(target, drafter, tree=tree)
            dec.generate(prompt, max_new_tokens=8, eos_token_id=[])
            t = time.perf_counter()
            out = dec.generate(prompt, max_new_tokens=args.tokens, eos_token_id=[])
            tps = args.tokens / (time.perf_counter() - t)
            same = out.sequences[0].tolist() == ref.sequences[0].tolist()
            first_diff = next((i for i, (a, b) in enumerate(zip(out.new_tokens, ref.new_tokens)) if a != b), None)
            runs[f"oracle err={err} tree={tree}"] = {"tokens_per_s": tps, "tau": out.tau, "speedup": tps / base,
                                                     "exact": same, "first_mismatch": first_diff,
                                                     "step_ms_median": sorted(out.step_times)[len(out.step_times) // 2] * 1e3}
            print(tree, err, runs[f"oracle err={err} tree={tree}"], flush=True)
    report["runs"] = runs
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
