"""Load test of `amphista serve`: requests/s and tokens/s at 1, 8 and 32 clients, vanilla vs drafted.

    python scripts/serve_load.py                      # bundled model: vanilla vs the bundled Amphista drafter
    python scripts/serve_load.py --drafter none --drafter out/amphista --max-tokens 128 --out load.json
    python scripts/serve_load.py --url http://127.0.0.1:8000 --model stories260K   # an already running server
    python scripts/serve_load.py --concurrent-vs-sequential 8   # continuous batching: 8 at once vs one by one

Each setting starts its own `amphista serve` subprocess (so client and server do not share a GIL), sends one
warm-up request, then for each concurrency level keeps C clients busy (asyncio + httpx) until --requests
requests have finished. `--concurrent-vs-sequential N` instead sends N requests one after another, then the
same N at once, and reports both wall times, their ratio and whether the answers are identical (greedy
answers must be: each row of a batch decodes exactly as it would alone). Greedy decoding (temperature 0). The
bundled model completes its story openings (/v1/completions); a --target (a chat model) gets MT-Bench's first
turns as chat requests (/v1/chat/completions, through its chat template), what its drafters were trained for
and what a chat server serves; --prompts picks either for any target. When the
bundled drafter is not installed, "amphista" means a freshly initialised (untrained) drafter: lossless but
with tau near 1, so it measures the overhead of drafting, not its speed-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def prompts(name: str) -> list[str]:
    """The first turns of a bundled question set ("stories" or "mt_bench"), taking the categories in turn (the
    first question of each, then the second of each, ...): a few requests already mix them, as MT-Bench's
    per-category benchmark does, rather than being all of its first category."""
    from amphista.bench.questions import load_questions

    by_category: dict[str, list[str]] = {}
    for q in load_questions(name):
        by_category.setdefault(q.category, []).append(q.turns[0])
    columns = list(by_category.values())
    return [c[i] for i in range(max(map(len, columns))) for c in columns if i < len(c)]


def request(model: str, text: str, max_tokens: int, chat: bool) -> tuple[str, dict]:
    """(endpoint, body) of one greedy request."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    if chat:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}
    return "/v1/completions", {**body, "prompt": text}


def answer(data: dict, chat: bool) -> str:
    choice = data["choices"][0]
    return choice["message"]["content"] if chat else choice["text"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_drafter(spec: str, target: str | None, tmp: str) -> tuple[str, str]:
    """(label, --drafter value). 'amphista'/'medusa' fall back to an untrained drafter when not bundled."""
    if spec in ("amphista", "medusa"):
        from amphista import bundled
        from amphista.errors import CheckpointError

        try:
            return spec, str(bundled.default_drafter_path(spec, target))  # the drafter shipped for the target
        except CheckpointError:
            import amphista

            t = amphista.TargetModel.load(target) if target else amphista.load_default_target()
            cls = amphista.AmphistaDrafter if spec == "amphista" else amphista.MedusaDrafter
            path = os.path.join(tmp, spec)
            cls.for_target(t).save_pretrained(path)
            return f"{spec} (untrained)", path
    return ("vanilla" if spec == "none" else Path(spec).name), spec


def start_server(
    target: str | None, drafter: str, tree: str | None, port: int, threads: int | None, max_batch_size: int
):
    cmd = [
        sys.executable,
        "-m",
        "amphista.cli",
        "serve",
        "--port",
        str(port),
        "--drafter",
        drafter,
        "--log-level",
        "warning",
        "--max-queue",
        "1024",
        "--max-batch-size",
        str(max_batch_size),
    ]
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--target", target] if target else []
    cmd += ["--tree", tree] if tree else []
    env = {k: v for k, v in os.environ.items() if k != "AMPHISTA_API_KEY"}
    return subprocess.Popen(cmd, env=env)


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the server at {url} did not become healthy in {timeout:.0f} s")


async def run_level(
    url: str, model: str, clients: int, total: int, max_tokens: int, texts: list[str], chat: bool
) -> dict:
    """`clients` concurrent clients share `total` requests; returns throughput and latency figures."""
    todo = iter(range(total))
    latencies: list[float] = []
    tokens, taus = 0, []

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in todo:
            endpoint, body = request(model, texts[i % len(texts)], max_tokens, chat)
            t0 = time.perf_counter()
            r = await http.post(endpoint, json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            data = r.json()
            tokens += data["usage"]["completion_tokens"]
            taus.append(data.get("amphista", {}).get("tau", 1.0))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "clients": clients,
        "requests": total,
        "seconds": round(wall, 3),
        "requests_per_s": round(total / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "mean_tau": round(sum(taus) / len(taus), 3),
        "p50_latency_s": round(latencies[len(latencies) // 2], 3),
        "max_latency_s": round(latencies[-1], 3),
    }


async def concurrent_vs_sequential(
    url: str, model: str, n: int, max_tokens: int, texts: list[str], chat: bool
) -> dict:
    """The same n greedy requests one after another, then all at once: wall times and whether they agree."""
    requests = [request(model, texts[i % len(texts)], max_tokens, chat) for i in range(n)]
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def one(endpoint: str, body: dict) -> str:
            r = await http.post(endpoint, json=body)
            r.raise_for_status()
            return answer(r.json(), chat)

        t0 = time.perf_counter()
        alone = [await one(*req) for req in requests]
        sequential = time.perf_counter() - t0
        t0 = time.perf_counter()
        together = await asyncio.gather(*(one(*req) for req in requests))
        concurrent = time.perf_counter() - t0
    return {
        "requests": n,
        "sequential_s": round(sequential, 3),
        "concurrent_s": round(concurrent, 3),
        "speedup": round(sequential / concurrent, 2),
        "identical": alone == list(together),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="model folder (default: the bundled stories260K)")
    p.add_argument(
        "--drafter",
        action="append",
        help="'none', 'amphista', 'medusa' or a folder (repeatable; default: none and amphista)",
    )
    p.add_argument("--tree", default=None)
    p.add_argument(
        "--prompts",
        choices=["stories", "mt_bench"],
        help="story openings as completions, or MT-Bench first turns as chat requests (default: stories for "
        "the bundled model, mt_bench with --target)",
    )
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads (serve --threads)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level (at least C)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="the server's --max-batch-size (1: one request at a time)",
    )
    p.add_argument(
        "--concurrent-vs-sequential",
        type=int,
        metavar="N",
        help="instead of the concurrency levels: N requests one after another, then the same N at once",
    )
    p.add_argument("--url", help="measure this running server instead of starting one per drafter")
    p.add_argument("--model", default="stories260K", help="model id to send with --url")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()

    kind = args.prompts or ("mt_bench" if args.target else "stories")
    texts, chat = prompts(kind), kind == "mt_bench"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = (
            [("server", None)]
            if args.url
            else [resolve_drafter(d, args.target, tmp) for d in args.drafter or ["none", "amphista"]]
        )
        for label, drafter in settings:
            proc, url, model = None, args.url, args.model
            if not args.url:
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                proc = start_server(args.target, drafter, args.tree, port, args.threads, args.max_batch_size)
            try:
                wait_healthy(url, proc)
                model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
                asyncio.run(run_level(url, model, 1, 2, args.max_tokens, texts, chat))  # warm-up
                if args.concurrent_vs_sequential:
                    n = args.concurrent_vs_sequential
                    rows = [
                        asyncio.run(concurrent_vs_sequential(url, model, n, args.max_tokens, texts, chat))
                    ]
                else:
                    rows = (
                        asyncio.run(
                            run_level(url, model, c, max(args.requests, c), args.max_tokens, texts, chat)
                        )
                        for c in args.concurrency
                    )
                for row in rows:
                    results.append({"setting": label, **row})
                    print(json.dumps(results[-1]), flush=True)
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)

    if args.concurrent_vs_sequential:
        print("\n| setting | requests | one by one (s) | at once (s) | speed-up | identical |")
        print("|---|---:|---:|---:|---:|---|")
        keys = ("setting", "requests", "sequential_s", "concurrent_s", "speedup", "identical")
    else:
        print("\n| setting | clients | requests/s | tokens/s | mean tau | p50 latency (s) |")
        print("|---|---:|---:|---:|---:|---:|")
        keys = ("setting", "clients", "requests_per_s", "tokens_per_s", "mean_tau", "p50_latency_s")
    for r in results:
        cells = [r[k] for k in keys]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.out:
        meta = {
            "max_tokens": args.max_tokens,
            "prompts": kind,
            "target": args.target or "bundled stories260K",
            "tree": args.tree,
            "max_batch_size": None if args.url else args.max_batch_size,
            "cpu_count": os.cpu_count(),
        }
        Path(args.out).write_text(json.dumps({"config": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
