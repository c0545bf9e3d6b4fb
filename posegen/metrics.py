"""Prometheus metrics.

The API process: requests, submits by status code, cancellations, and (read at scrape time)
jobs queued/processing per model and messages waiting per broker queue. Worker processes:
jobs by final status and model, queue-wait and run-time histograms, webhook attempts by
outcome — recorded in prometheus multiprocess mode and served by `posegen worker
--metrics-port`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class QueueCollector(Collector):
    def __init__(
        self,
        counts: Callable[[], Iterable[tuple[str, str, int]]],
        depths: Callable[[], dict[str, int]],
        serving: Callable[[], dict[str, int] | None],
    ) -> None:
        self.counts = counts
        self.depths = depths
        self.serving = serving

    def collect(self) -> Iterable[Any]:
        active = GaugeMetricFamily(
            "posegen_jobs_active",
            "Jobs queued or processing, by model.",
            labels=["status", "model"],
        )
        for status, model, count in _safely(lambda: list(self.counts()), []):
            active.add_metric([status, model], count)
        yield active
        depth = GaugeMetricFamily(
            "posegen_queue_depth", "Messages waiting in each broker queue.", labels=["queue"]
        )
        for queue, count in _safely(self.depths, {}).items():
            depth.add_metric([queue], count)
        yield depth
        workers = GaugeMetricFamily(
            "posegen_model_workers",
            "Workers serving each model (absent where the broker cannot tell). Queued jobs "
            'of a model no worker serves wait: alert on posegen_jobs_active{status="queued"} '
            "without workers.",
            labels=["model"],
        )
        for model, count in (_safely(self.serving, None) or {}).items():
            workers.add_metric([model], count)
        yield workers


def _safely(read: Callable[[], Any], default: Any) -> Any:
    try:
        return read()
    except Exception:  # noqa: BLE001 - a scrape must not fail because a dependency is down
        return default


class JobMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kwargs: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.finished = Counter(
            "posegen_jobs_finished",
            "Jobs by final status and model.",
            ["status", "model"],
            **kwargs,
        )
        self.queue_wait = Histogram(
            "posegen_job_queue_wait_seconds",
            "From submit to a worker starting the job.",
            ["model"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 1800),
            **kwargs,
        )
        self.run_time = Histogram(
            "posegen_job_run_seconds",
            "From start to completion on the worker.",
            ["model"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
            **kwargs,
        )
        self.batch_images = Histogram(
            "posegen_batch_images",
            "Images a worker ran in one pipeline call (POSEGEN_MAX_BATCH; a job's num_outputs).",
            ["model"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
            **kwargs,
        )
        self.webhook_attempts = Counter(
            "posegen_webhook_attempts",
            "Webhook delivery attempts by outcome.",
            ["outcome"],
            **kwargs,
        )


_job_metrics: JobMetrics | None = None


def job_metrics() -> JobMetrics:
    """This worker process's job metrics, in the default (multiprocess-aware) registry."""
    global _job_metrics
    if _job_metrics is None:
        _job_metrics = JobMetrics()
    return _job_metrics


class Metrics:
    """The API process's registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "posegen_http_requests",
            "HTTP requests by route, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "posegen_http_request_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.submits = Counter(
            "posegen_submits",
            "Generation submits by HTTP status code.",
            ["status"],
            registry=self.registry,
        )
        self.jobs = JobMetrics(self.registry)

    def watch_queue(
        self,
        counts: Callable[[], Iterable[tuple[str, str, int]]],
        depths: Callable[[], dict[str, int]],
        serving: Callable[[], dict[str, int] | None],
    ) -> None:
        self.registry.register(QueueCollector(counts, depths, serving))


def serve_multiprocess(port: int, host: str = "0.0.0.0") -> None:
    """Serve the metrics that every process under PROMETHEUS_MULTIPROC_DIR recorded."""
    from prometheus_client import multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(port, addr=host, registry=registry)
