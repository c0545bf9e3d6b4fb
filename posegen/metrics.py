"""Prometheus metrics of the API process: requests, submits by status, the live queue."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class QueueCollector(Collector):
    """Jobs queued/processing per model, read from the database at scrape time."""

    def __init__(self, counts: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self.counts = counts

    def collect(self) -> Iterable[Any]:
        family = GaugeMetricFamily(
            "posegen_jobs_active",
            "Jobs queued or processing, by model.",
            labels=["status", "model"],
        )
        try:
            rows = list(self.counts())
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database is down
            rows = []
        for status, model, count in rows:
            family.add_metric([status, model], count)
        yield family


class Metrics:
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

    def watch_queue(self, counts: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self.registry.register(QueueCollector(counts))
