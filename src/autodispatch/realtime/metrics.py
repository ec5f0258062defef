"""Realtime metrics: nothing is dropped without being counted with its reason."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

LATENCY_BUCKETS = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
)  # fmt: skip


# From commit to the reader holding the event: the database's commit, NOTIFY and the
# read. Finer than LATENCY_BUCKETS: on a quiet gateway it is about a millisecond.
READ_BUCKETS = (
    0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.1, 0.25, 1.0
)  # fmt: skip


class SentFrames:
    """Row-event frames written to one transport's connections, and their commit-to-send
    latency. Counted once per frame on the hot path, so plain numbers (one event loop
    writes them; a scrape reads them) instead of a locked Prometheus child per frame."""

    __slots__ = ("bounds", "buckets", "count", "seconds")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.count = 0
        self.seconds = 0.0

    def sent(self, latency: float) -> None:
        latency = max(latency, 0.0)
        self.count += 1
        self.seconds += latency
        self.buckets[bisect_left(self.bounds, latency)] += 1


class SentCollector:
    """Exposes every transport's ``SentFrames`` as ``autodispatch_realtime_delivered_total``
    and the ``autodispatch_realtime_commit_to_send_seconds`` histogram."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.transports: dict[str, SentFrames] = {}

    def transport(self, name: str) -> SentFrames:
        found = self.transports.get(name)
        if found is None:
            found = self.transports[name] = SentFrames(self.bounds)
        return found

    def collect(self) -> Iterator[Metric]:
        delivered = CounterMetricFamily(
            "autodispatch_realtime_delivered",
            "Row events written to a subscriber's connection, by transport",
            labels=["transport"],
        )
        latency = HistogramMetricFamily(
            "autodispatch_realtime_commit_to_send_seconds",
            "From the event's time in the log to its frame being written to the socket",
            labels=["transport"],
        )
        for name, frames in list(self.transports.items()):
            delivered.add_metric([name], frames.count)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip(self.bounds, frames.buckets, strict=False):
                cumulative += n
                buckets.append((repr(bound), cumulative))
            buckets.append(("+Inf", frames.count))
            latency.add_metric([name], buckets, frames.seconds)
        yield delivered
        yield latency


class RealtimeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events_read = Counter(
            "autodispatch_realtime_events_read_total", "Events read from the log", registry=registry
        )
        self.sent = SentCollector(LATENCY_BUCKETS)
        registry.register(self.sent)
        self.sequenced = Counter(
            "autodispatch_realtime_events_sequenced_total",
            "Events this process's sequencer gave their ids (after their commit)",
            registry=registry,
        )
        self.not_delivered = Counter(
            "autodispatch_realtime_not_delivered_total",
            "Candidate deliveries that did not happen, by reason",
            ["reason"],
            registry=registry,
        )
        self.disconnects = Counter(
            "autodispatch_realtime_disconnects_total",
            "Connections closed, by transport and reason",
            ["transport", "reason"],
            registry=registry,
        )
        self.subscribers = Gauge(
            "autodispatch_realtime_subscribers",
            "Open subscriptions, by transport",
            ["transport"],
            registry=registry,
        )
        self.log_lag = Gauge(
            "autodispatch_realtime_log_lag_seconds",
            "Age of the newest event read when it was read (0 when caught up)",
            registry=registry,
        )
        self.position = Gauge(
            "autodispatch_realtime_log_position", "Id of the last event read", registry=registry
        )
        self.commit_to_read = Histogram(
            "autodispatch_realtime_commit_to_read_seconds",
            "From the event's time in the log to the reader holding it (before routing)",
            buckets=READ_BUCKETS,
            registry=registry,
        )
        self.route_seconds = Histogram(
            "autodispatch_realtime_route_seconds",
            "Time to route one event to all its candidates",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.reader_errors = Counter(
            "autodispatch_realtime_reader_errors_total",
            "Failed reads of the event log (retried)",
            registry=registry,
        )
        # What the database pays for realtime, so `autodispatch bench realtime` can show it
        # does not grow with subscribers (DESIGN section 7). A service transaction counts
        # as its BEGIN, its statements and its COMMIT.
        self.db_statements = Counter(
            "autodispatch_realtime_db_statements_total",
            "SQL statements sent by the realtime reader, router and hub, by purpose",
            ["purpose"],
            registry=registry,
        )

    def statements(self, purpose: str, n: int = 1) -> None:
        self.db_statements.labels(purpose).inc(n)

    def count(self, outcomes: Mapping[str, int], transport_hint: str) -> None:
        for reason, n in outcomes.items():
            if reason == "delivered":
                continue  # counted by the sink, which knows its transport
            if reason in ("buffered", "duplicate", "table_not_subscribed"):
                continue  # not a loss: delivered later, already delivered, or not asked for
            self.not_delivered.labels(reason).inc(n)
