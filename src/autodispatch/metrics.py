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
            "HTTP request latency by route template, method and status",
            ["route", "method", "status"],
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
        # Alerts as mechanics' pages report them (POST /api/alert-receipts), each counted once.
        self.alert_tiers = Counter(
            "autodispatch_alert_tiers_total",
            "Alert tiers reported by mechanics' pages, by tier and what happened",
            ["tier", "status"],
            registry=self.registry,
        )
        self.alert_commit_to_shown = Histogram(
            "autodispatch_alert_commit_to_shown_seconds",
            "Time from a request's commit to its alert on a mechanic's page",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
            registry=self.registry,
        )
        # Web Push to mechanics whose page is closed (api/push_sender.py).
        self.push_sends = Counter(
            "autodispatch_push_sends_total",
            "Web Push messages by outcome: sent, failed, gone (subscription deleted)",
            ["outcome"],
            registry=self.registry,
        )
        self.push_skipped = Counter(
            "autodispatch_push_skipped_total",
            "Takeable requests not pushed, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.push_runs = Counter(
            "autodispatch_push_runs_total",
            "Runs of the push sender, by outcome (ok; busy: another process sends; missing:"
            " realtime.push_cursor has no row; raced: another sender moved the cursor; error)",
            ["outcome"],
            registry=self.registry,
        )
        self.push_disabled = Counter(
            "autodispatch_push_subscriptions_disabled_total",
            "Push subscriptions deleted after too many failed pushes in a row",
            registry=self.registry,
        )
