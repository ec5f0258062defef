"""Prometheus metrics, one registry per app (tests build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "autodispatch_http_requests_total",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "autodispatch_http_request_seconds",
            "HTTP request latency by route",
            ["route"],
            registry=self.registry,
        )
        self.expiry_runs = Counter(
            "autodispatch_expiry_runs_total",
            "Runs of the offer and request expiry task, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.expired = Counter(
            "autodispatch_expired_total",
            "Offers returned to the queue and requests expired",
            ["kind"],
            registry=self.registry,
        )
