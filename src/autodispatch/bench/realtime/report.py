"""What a run measured: options, measured windows, statement counts, memory; the machine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autodispatch.bench.realtime.floor import Floor

Progress = Callable[[str], None]

LATENCY_LIMIT = 0.100  # a ramp step is "within the limit" when its p99 is at most this


@dataclass
class RealtimeOptions:
    subscribers: int = 1000  # for the latency figure and the ramp
    idle_connections: int = 5000  # for memory, and the "many subscribers" statement count
    rate: float = 100.0  # events/s of the latency figure
    duration: float = 30.0  # seconds of the latency figure
    # The ramp: event rates from ramp_start up by ramp_factor, until the server falls
    # behind (it has not routed everything keep_up_seconds after the writes stop).
    ramp_start: float = 20.0
    ramp_factor: float = 1.4
    ramp_steps: int = 13
    step_seconds: float = 10.0  # seconds measured per ramp step
    keep_up_seconds: float = 1.0
    statements_rate: float = 10.0  # events/s while counting statements
    statements_seconds: float = 10.0
    processes: int = 2  # subscriber processes
    latency_gateways: int = 2  # the latency figure again on this many gateways (< 2: not)
    writer_connections: int = 12
    database_url: str | None = None
    baseline: bool = True
    baseline_ramp_start: float = 0.5
    baseline_ramp_factor: float = 2.0
    baseline_ramp_steps: int = 7
    baseline_step_seconds: float = 20.0  # few events per second: longer steps
    baseline_duration: float = 3.0  # the baseline at `rate` falls behind: keep it short
    quick: bool = False
    profile_server: Path | None = None  # run the keys server under pyinstrument

    @classmethod
    def quick_options(cls, **overrides: Any) -> RealtimeOptions:
        values: dict[str, Any] = {
            "subscribers": 300,
            "idle_connections": 1000,
            "duration": 8.0,
            "step_seconds": 5.0,
            "ramp_start": 25.0,
            "ramp_steps": 5,
            "ramp_factor": 2.0,
            "statements_seconds": 5.0,
            "baseline_ramp_steps": 4,
            "baseline_step_seconds": 8.0,
            "baseline_duration": 3.0,
            "quick": True,
        }
        values.update(overrides)
        return cls(**values)


@dataclass
class Window:
    """One measured stretch of load: what was written, delivered and received, and how fast."""

    strategy: str
    name: str
    subscribers: int
    target_rate: float
    gateways: int = 1  # serve processes sharing the subscribers
    seconds: float = 0.0  # of writes measured
    elapsed: float = 0.0  # from the start of the measure until all was routed (or gave up)
    events: int = 0  # read and routed by the server
    received: int = 0  # postgres_changes frames received by the subscribers
    server_delivered: int = 0  # frames the server wrote (its own counter)
    p50_ms: float = float("nan")  # commit to received, over every frame received
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    server_p50_ms: float = float("nan")  # commit to written, the server's own histogram
    server_p99_ms: float = float("nan")  # (upper bounds of its buckets)
    # Commit to the gateways' readers holding the event, median over the events read
    # (autodispatch_realtime_commit_to_read_seconds, a bucket's upper bound): the part
    # before any fan-out, with the wait behind the routing of earlier events.
    read_p50_ms: float = float("nan")
    server_cpu: float = float("nan")  # percent of one core
    postgres_cpu: float = float("nan")
    generator_cpu: float = float("nan")
    machine_cpu: float = float("nan")  # every process on the machine (all cores)
    disconnects: int = 0
    drain_seconds: float | None = None  # after the writes stopped; None: never caught up
    kept_up: bool = False  # caught up within keep_up_seconds of the last write
    within_limit: bool = False  # kept up, p99 <= LATENCY_LIMIT, nobody disconnected

    @property
    def other_cpu(self) -> float:
        """Percent of a core that processes other than the bench's used meanwhile."""
        return self.machine_cpu - self.server_cpu - self.postgres_cpu - self.generator_cpu

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def deliveries_per_s(self) -> float:
        # Behind: the frames kept arriving after the writes stopped; count that time too.
        seconds = self.seconds if self.kept_up else self.elapsed
        return self.received / seconds if seconds else 0.0

    @property
    def fan_out(self) -> float:
        return self.received / self.events if self.events else 0.0


@dataclass
class StatementCount:
    strategy: str
    subscribers: int
    events: int = 0
    realtime_counter: int = 0  # per-event purposes of autodispatch_realtime_db_statements_total
    pg_server: int | None = None  # pg_stat_statements: every statement the server sent
    pg_background: int | None = None  # ... in as long a stretch without events

    @property
    def counter_per_event(self) -> float:
        return self.realtime_counter / self.events if self.events else float("nan")

    @property
    def pg_per_event(self) -> float | None:
        if self.pg_server is None or not self.events:
            return None
        return (self.pg_server - (self.pg_background or 0)) / self.events


@dataclass
class Memory:
    connections: int
    rss_before: int
    rss_after: int
    open_seconds: float

    @property
    def per_connection(self) -> float:
        return (self.rss_after - self.rss_before) / self.connections if self.connections else 0


@dataclass
class Report:
    machine: str
    date: str
    options: RealtimeOptions
    generator_processes: int
    windows: list[Window] = field(default_factory=list)
    statements: list[StatementCount] = field(default_factory=list)
    memory: list[Memory] = field(default_factory=list)
    pg_stat_statements: bool = False
    floor: Floor | None = None  # the machine's floor for the biggest fan-out (floor.py)
    notes: list[str] = field(default_factory=list)

    def window(self, strategy: str, name: str) -> Window | None:
        return next((w for w in self.windows if w.strategy == strategy and w.name == name), None)

    def ramp(self, strategy: str) -> list[Window]:
        return [w for w in self.windows if w.strategy == strategy and w.name.startswith("ramp")]

    def best(self, strategy: str, *, within_limit: bool) -> Window | None:
        """The ramp step with the most deliveries/s that kept up (and met the p99 limit)."""
        ok = [w for w in self.ramp(strategy) if (w.within_limit if within_limit else w.kept_up)]
        return max(ok, key=lambda w: w.deliveries_per_s, default=None)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["options"]["profile_server"] = str(self.options.profile_server or "")
        for w, raw in zip(self.windows, data["windows"], strict=True):
            raw.update(
                events_per_s=w.events_per_s,
                deliveries_per_s=w.deliveries_per_s,
                other_cpu=w.other_cpu,
            )
        return data
