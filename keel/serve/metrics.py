"""Prometheus metrics on /metrics: requests, latency, batch sizes, queue depth, generated tokens and tokens/s.

Each app gets its own registry, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("keel_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram(
            "keel_request_latency_seconds", "request latency by route", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "keel_batch_size",
            "inputs per forward pass (classify/embeddings) or running sequences per decode step (generation)",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("keel_queue_depth", "requests waiting for the model", ["kind"], registry=r)
        self.running = Gauge("keel_running_sequences", "sequences in the running decode batch", registry=r)
        self.tokens = Counter("keel_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("keel_prompt_tokens", "prompt tokens processed", registry=r)
        self.tokens_per_s = Gauge(
            "keel_generation_tokens_per_second", "generated tokens/s over the last 10 s", registry=r
        )
        self.rejected = Counter("keel_rejected", "requests refused before running", ["reason"], registry=r)
        self._recent: deque = deque()  # (time, tokens) for the 10 s window

    def add_tokens(self, n: int) -> None:
        if n <= 0:
            return
        t = time.monotonic()
        self.tokens.inc(n)
        self._recent.append((t, n))
        while self._recent and self._recent[0][0] < t - 10.0:
            self._recent.popleft()
        span = max(t - self._recent[0][0], 1.0) if self._recent else 1.0
        self.tokens_per_s.set(sum(k for _, k in self._recent) / span)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
