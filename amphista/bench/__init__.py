"""Spec-Bench-style speed evaluation: vanilla decoding and every drafter, same prompts, same process.

    results = amphista.bench.run_benchmark(amphista.bench.BenchConfig(questions="q.jsonl", out="results"))
    results["methods"]["amphista"]["speedup"]

See docs/benchmark.md for what each number means.
"""

from .questions import Question, default_questions_path, load_questions
from .runner import BenchConfig, benchmark, run_benchmark

__all__ = [
    "BenchConfig",
    "benchmark",
    "Question",
    "default_questions_path",
    "load_questions",
    "run_benchmark",
]
