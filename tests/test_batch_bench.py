"""`amphista bench --batch-sizes`: every method at every batch size, rows checked against plain decoding."""

from __future__ import annotations

import json

import pytest

from amphista.bench.batching import PLAIN, PLAIN_HF, BatchBenchConfig, batch_markdown, run_batch_benchmark
from amphista.bundled import default_drafter_path
from amphista.cli import main


def test_batch_benchmark_covers_every_method_and_size_and_rows_match():
    results = run_batch_benchmark(
        BatchBenchConfig(batch_sizes=[2, 1], tree_sizes=[4], max_new_tokens=12, progress=False, runs=2)
    )
    methods = {r["method"] for r in results["rows"]}
    assert methods == {PLAIN, PLAIN_HF, "medusa@4", "medusa@auto", "amphista@4", "amphista@auto"}
    assert sorted({r["batch"] for r in results["rows"]}) == [1, 2] == results["settings"]["batch_sizes"]
    for r in results["rows"]:
        assert r["mismatched_rows"] == 0, r  # greedy: every row equals amphista's plain decoding
        assert r["new_tokens"] == 12 * r["batch"] and r["tokens_per_s"] > 0
        assert len(r["runs_tokens_per_s"]) == 2 and r["tokens_per_s"] == max(r["runs_tokens_per_s"])  # the fastest
    best = {b: max(r["tokens_per_s"] for r in results["rows"] if r["batch"] == b and r["method"] in (PLAIN, PLAIN_HF))
            for b in (1, 2)}  # fmt: skip
    assert all(abs(r["vs_plain"] * best[r["batch"]] - r["tokens_per_s"]) < 1e-6 for r in results["rows"])
    for r in results["rows"]:  # run by run against the same run of the faster plain decoding
        base = next(p for p in results["rows"] if p["batch"] == r["batch"] and p["tokens_per_s"] == best[r["batch"]])
        expected = [a / b for a, b in zip(r["runs_tokens_per_s"], base["runs_tokens_per_s"])]
        assert r["runs_vs_plain"] == expected and r["median_vs_plain"] == sum(expected) / 2
    assert set(results["sequential_tokens_per_s"]) == {PLAIN, "medusa@4", "medusa@auto", "amphista@4", "amphista@auto"}
    for r in results["rows"]:  # against the same decoder on the same prompts, one after another
        timed = results["sequential_per_prompt"].get(r["method"])
        if timed is None:
            assert r["vs_sequential"] is None and r["method"] == PLAIN_HF
            continue
        assert len(timed) == 2 and all(new == 12 for new, _ in timed)
        seconds = sum(s for _, s in timed[: r["batch"]])
        assert r["vs_sequential"] == pytest.approx(r["tokens_per_s"] * seconds / (12 * r["batch"]))
    table = batch_markdown(results)
    assert "| batch |" in table and "amphista@auto" in table and "rows differ" not in table
    assert "fastest of 2 interleaved runs" in table
    assert "the same rows one after another" in table
    paired = table.split("Run by run")[1]  # the second table: median (lowest-highest) of the per-run ratios
    r = next(r for r in results["rows"] if r["batch"] == 2 and r["method"] == "amphista@4")
    lo, hi = min(r["runs_vs_plain"]), max(r["runs_vs_plain"])
    assert f"{r['median_vs_plain']:.2f}x ({lo:.2f}-{hi:.2f})" in paired.splitlines()[5]  # the row of batch 2


def test_bench_batch_sizes_command_writes_results(tmp_path, capsys):
    out = tmp_path / "batch"
    medusa = default_drafter_path("medusa")
    code = main(["bench", "--batch-sizes", "1,2", "--tree-sweep", "4", "--max-new-tokens", "6", "--drafter",
                 f"medusa={medusa}", "--no-hf-baseline", "--runs", "1", "--quiet", "--out", str(out)])  # fmt: skip
    assert code == 0
    data = json.loads((out / "batch_results.json").read_text())
    assert {r["method"] for r in data["rows"]} == {PLAIN, "medusa@4", "medusa@auto"}
    assert (out / "batching.png").stat().st_size > 0 and "| batch |" in (out / "batch_results.md").read_text()
    assert "| batch |" in capsys.readouterr().out


def test_bench_batch_sizes_are_checked(tmp_path, capsys):
    assert main(["bench", "--batch-sizes", "1,x", "--out", str(tmp_path / "o")]) == 2
    assert "--batch-sizes" in capsys.readouterr().err
