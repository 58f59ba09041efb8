"""Prometheus metrics of one server, served at ``GET /metrics``.

Each engine keeps its own registry (not the process-wide default), so that several servers in
one process, as in the tests, count separately.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .batching import BatchObserver, Job

if TYPE_CHECKING:
    from .batching import Batcher

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    """The server's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "quiver_requests", "HTTP requests answered, by route template and status code", ["route", "status"], registry=registry
        )
        self.request_seconds = Histogram(
            "quiver_request_duration_seconds", "Time to answer an HTTP request, by route", ["route"], buckets=_LATENCY_BUCKETS, registry=registry
        )

        self.time_to_first_token = Histogram(
            "quiver_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first token, queueing included",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.generation_seconds = Histogram(
            "quiver_generation_duration_seconds", "Time from a generation request's arrival to its last token", buckets=_LATENCY_BUCKETS, registry=registry
        )

        self.generated_tokens = Counter("quiver_generated_tokens", "Tokens generated", registry=registry)
        self.prompt_tokens = Counter("quiver_prompt_tokens", "Prompt tokens of finished generations", registry=registry)
        self.generations = Counter(
            "quiver_generations", "Generations that ended, by outcome (finished, cancelled, timed_out)", ["outcome"], registry=registry
        )
        self.expert_tokens = Counter(
            "quiver_expert_tokens",
            "Generated tokens routed to each expert; a token mixing experts counts for each its mean routing weight",
            ["expert"],
            registry=registry,
        )

        self.queue_depth = Gauge("quiver_queue_depth", "Requests waiting for a place in the batch", registry=registry)
        self.running = Gauge("quiver_batch_running", "Requests in the running batch", registry=registry)
        self.batch_size = Histogram(
            "quiver_batch_size", "Requests in the batch at each generation step", buckets=_BATCH_BUCKETS, registry=registry
        )

    def watch(self, batcher: Batcher) -> None:
        """Read the queue depth and the running batch from ``batcher`` whenever metrics are scraped."""
        self.queue_depth.set_function(lambda: batcher.queue_depth)
        self.running.set_function(lambda: batcher.running)

    def batch_observer(self) -> BatchObserver:
        return _Observer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Observer(BatchObserver):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def step(self, running: int, waiting: int) -> None:
        if running:
            self.metrics.batch_size.observe(running)

    def first_token(self, job: Job, seconds: float) -> None:
        self.metrics.time_to_first_token.observe(seconds)

    def finished(self, job: Job, seconds: float) -> None:
        metrics = self.metrics
        tokens = len(job.output_ids)
        metrics.generations.labels("finished").inc()
        metrics.generation_seconds.observe(seconds)
        metrics.generated_tokens.inc(tokens)
        metrics.prompt_tokens.inc(len(job.prompt_ids))
        for expert, weight in job.mean_routing().items():
            if weight > 0:
                metrics.expert_tokens.labels(expert).inc(weight * tokens)

    def cancelled(self, job: Job) -> None:
        self.metrics.generations.labels("cancelled").inc()
        self.metrics.generated_tokens.inc(len(job.output_ids))

    def timed_out(self, job: Job) -> None:
        self.metrics.generations.labels("timed_out").inc()
        self.metrics.generated_tokens.inc(len(job.output_ids))
