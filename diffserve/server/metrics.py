"""Prometheus metrics, on a registry of their own per app (two apps in one process never collide).

Warmup never shows here: it runs inside the worker before it reports ready, outside the engine's queue.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge(
            "diffserve_queue_depth", "Requests admitted and waiting for the worker", registry=r
        )
        self.running = Gauge(
            "diffserve_running_requests", "Requests the worker has started and not answered yet", registry=r
        )
        self.worker_ready = Gauge("diffserve_worker_ready", "1 when the worker is warm and alive", registry=r)
        self.worker_restarts = Counter(
            "diffserve_worker_restarts", "Worker processes restarted after exit", registry=r
        )
        self.http_latency = Histogram(
            "diffserve_http_request_duration_seconds",
            "HTTP request latency per route (until the last byte)",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "diffserve_queue_wait_seconds",
            "Admission to the start of the request's generation in the worker",
            ["task"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.generation = Histogram(
            "diffserve_generation_seconds",
            "Start of the generation to encoded result",
            ["task"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.step = Histogram(
            "diffserve_denoise_step_seconds", "Time of one denoising step", buckets=_STEP_BUCKETS, registry=r
        )
        self.stage = Histogram(
            "diffserve_stage_seconds",
            "Pipeline stage time reported by the runtime",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "diffserve_requests_finished", "Requests by outcome", ["task", "outcome"], registry=r
        )
        self.worker_cancelled = Counter(
            "diffserve_worker_cancelled",
            "Cancelled requests the worker stopped between denoising steps, or skipped before starting",
            registry=r,
        )
        self.errors = Counter(
            "diffserve_errors", "Error answers and failed requests by kind", ["kind"], registry=r
        )
        self.dit_forwards = Counter(
            "diffserve_dit_forwards",
            "DiT forwards of finished generations: computed, or reused from the step cache (cached); a "
            "forward of a batch of several requests counts once, shared among them",
            ["outcome"],
            registry=r,
        )
        self.batch_size = Histogram(
            "diffserve_batch_requests",
            "Requests per batch sent to the worker (merged into one runner call)",
            buckets=(1, 2, 3, 4, 6, 8, 16),
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
