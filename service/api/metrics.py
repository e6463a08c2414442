"""Prometheus metrics: request counts and latencies, and job/queue/worker gauges.

Gauges are read from Redis at scrape time (a custom collector), so every API replica
reports the same cluster-wide numbers and nothing has to be kept in sync.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.record.store import Store


class Metrics:
    """One registry per app (tests build several apps in one process)."""

    def __init__(self, store: Store, lease_seconds: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "seco_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "seco_http_request_seconds",
            "HTTP request latency (to response start)",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(_JobCollector(store, lease_seconds))


class _JobCollector(Collector):
    def __init__(self, store: Store, lease_seconds: int) -> None:
        self.store = store
        self.lease_seconds = lease_seconds

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self.store.status_counts()
            queued = self.store.queue_length()
            workers = len(self.store.live_workers(self.lease_seconds))
        except Exception:  # Redis down: report what we can (the up gauge)
            yield GaugeMetricFamily("seco_store_up", "Redis reachable", value=0)
            return
        yield GaugeMetricFamily("seco_store_up", "Redis reachable", value=1)
        jobs = GaugeMetricFamily("seco_jobs", "Jobs by status", labels=["status"])
        for status, n in counts.items():
            jobs.add_metric([status], n)
        yield jobs
        yield GaugeMetricFamily("seco_queue_length", "Jobs waiting for a worker", value=queued)
        yield GaugeMetricFamily("seco_workers_alive", "Workers with a recent heartbeat", value=workers)


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods labelled by name; any other (a client may send any token) is counted as "other"."""


def method_label(method: str) -> str:
    """The `method` label of a request: a known method, else "other".

    Labels must come from a fixed set: every distinct value is a new series kept for the
    life of the process, and anyone who can reach the port (no key needed) picks the method.
    """
    return method if method in KNOWN_METHODS else "other"


def route_label(scope: Scope) -> str:
    """The `route` label: the matched route's template, else "unmatched" (never the raw path)."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else "unmatched"


class MetricsMiddleware:
    """Counts requests by method and route template from fixed sets (`method_label`,
    `route_label`), so no request can add series of its own."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def _send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                method, route = method_label(scope["method"]), route_label(scope)
                self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)
                self.metrics.requests.labels(method, route, str(status[0])).inc()
            await send(message)

        await self.app(scope, receive, _send)
