"""Server metrics in the Prometheus text format, kept next to the loop that produces them.

Counters only grow, so `rate(amphista_generated_tokens_total[1m])` gives throughput. Two gauges give it
without a query: tokens/s is the decode speed one request sees (its tokens / its wall time, over the latest
requests), batch tokens/s what the decoder delivers for all rows together while it has work (over the
latest decode steps); with batching the second exceeds the first.
"""

from __future__ import annotations

import threading
from collections import Counter, deque

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class Metrics:
    def __init__(
        self, max_accept: int, queue_depth=lambda: 0, rows_in_flight=lambda: 0, max_batch_size: int = 1
    ):
        self.lock = threading.Lock()
        self.max_accept = max(int(max_accept), 1)  # K + 1 for K drafter heads, 1 for vanilla decoding
        self.queue_depth, self.rows_in_flight = queue_depth, rows_in_flight  # callables: read when rendered
        self.max_batch_size = max_batch_size
        self.requests: Counter = Counter()  # (endpoint, HTTP status) -> count
        self.finished: Counter = Counter()  # finish reason ("stop", "length", "cancelled", "error") -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.accept = [0] * (self.max_accept + 1)  # accept[m]: target forwards that committed m tokens
        self.recent: deque = deque(maxlen=64)  # (tokens, seconds) of the latest generations
        self.steps: deque = deque(maxlen=64)  # (tokens of all rows, wall seconds) of the latest decode steps
        self.active = 0

    def request(self, path: str, status: int) -> None:
        endpoint = path if path in ENDPOINTS or path.startswith("/v1/models") else "other"
        endpoint = "/v1/models" if endpoint.startswith("/v1/models") else endpoint
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def step(self, accepted: int) -> None:
        with self.lock:
            self.generated_tokens += accepted
            self.accept[min(accepted, self.max_accept)] += 1

    def busy(self, tokens: int, seconds: float) -> None:
        """One pass of the decode loop: tokens committed by all rows, wall seconds since the previous pass
        (or since the worker woke up: idle time does not count)."""
        with self.lock:
            self.steps.append((tokens, seconds))

    def started(self, prompt_tokens: int) -> None:
        with self.lock:
            self.active += 1
            self.prompt_tokens += prompt_tokens

    def finish(self, reason: str, tokens: int = 0, seconds: float = 0.0, started: bool = True) -> None:
        with self.lock:
            self.finished[reason] += 1
            self.active -= int(started)
            if tokens and seconds > 0:
                self.recent.append((tokens, seconds))

    def tokens_per_second(self) -> float:
        tokens = sum(n for n, _ in self.recent)
        seconds = sum(s for _, s in self.recent)
        return tokens / seconds if seconds else 0.0

    def batch_tokens_per_second(self) -> float:
        seconds = sum(s for _, s in self.steps)
        return sum(n for n, _ in self.steps) / seconds if seconds else 0.0

    def mean_generation_seconds(self) -> float:
        """Wall time of the latest 64 generations, on average (0.0 before the first)."""
        with self.lock:
            return sum(s for _, s in self.recent) / len(self.recent) if self.recent else 0.0

    def render(self) -> str:
        with self.lock:
            lines = [
                "# HELP amphista_requests_total HTTP requests by endpoint and status code.",
                "# TYPE amphista_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'amphista_requests_total{{endpoint="{endpoint}",code="{status}"}} {n}')
            lines += [
                "# HELP amphista_generations_total Finished generations by finish reason.",
                "# TYPE amphista_generations_total counter",
            ]
            for reason in ("stop", "length", "cancelled", "error"):
                lines.append(f'amphista_generations_total{{reason="{reason}"}} {self.finished[reason]}')
            lines += _scalar(
                "prompt_tokens_total", "counter", "Prompt tokens of started generations.", self.prompt_tokens
            )
            lines += _scalar(
                "generated_tokens_total", "counter", "Tokens generated (committed).", self.generated_tokens
            )
            lines += _scalar(
                "tokens_per_second",
                "gauge",
                "Decode speed per request over the latest 64 generations (their tokens / their wall seconds).",
                round(self.tokens_per_second(), 3),
            )
            lines += _scalar(
                "batch_tokens_per_second",
                "gauge",
                "Tokens committed by all rows together per wall second of the latest 64 decode steps (idle "
                "time excluded).",
                round(self.batch_tokens_per_second(), 3),
            )
            lines += _scalar(
                "queue_depth", "gauge", "Requests waiting for a row (not yet admitted).", self.queue_depth()
            )
            lines += _scalar(
                "active_generations", "gauge", "Generations started and not yet finished.", self.active
            )
            lines += _scalar(
                "rows_in_flight", "gauge", "Sequences in the decode batch now.", self.rows_in_flight()
            )
            lines += _scalar(
                "max_batch_size",
                "gauge",
                "Most sequences decoded together (--max-batch-size).",
                self.max_batch_size,
            )
            lines += [
                "# HELP amphista_accept_length Tokens a row committed per target forward (tau), bonus included.",
                "# TYPE amphista_accept_length histogram",
            ]
            cumulative = self.accept[0]
            for m in range(1, self.max_accept + 1):
                cumulative += self.accept[m]
                lines.append(f'amphista_accept_length_bucket{{le="{m}"}} {cumulative}')
            lines.append(f'amphista_accept_length_bucket{{le="+Inf"}} {cumulative}')
            total = sum(m * n for m, n in enumerate(self.accept))
            lines.append(f"amphista_accept_length_sum {total}")
            lines.append(f"amphista_accept_length_count {sum(self.accept)}")
        return "\n".join(lines) + "\n"


def _scalar(name: str, kind: str, help: str, value) -> list[str]:
    return [f"# HELP amphista_{name} {help}", f"# TYPE amphista_{name} {kind}", f"amphista_{name} {value}"]
