"""Spec-Bench-style speed evaluation: vanilla decoding and every drafter, same prompts, same process.

    results = amphista.bench.run_benchmark(amphista.bench.BenchConfig(questions="q.jsonl", out="results"))
    results["methods"]["amphista"]["speedup"]

See docs/benchmark.md for what each number means.
"""

from __future__ import annotations

from .._lazy import lazy_module

_EXPORTS = {
    "Question": "questions",
    "bundled_questions_path": "questions",
    "default_questions_path": "questions",
    "load_questions": "questions",
    "BenchConfig": "runner",
    "benchmark": "runner",
    "run_benchmark": "runner",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_module(__name__, _EXPORTS)
