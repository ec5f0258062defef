"""`autodispatch bench writes`: what the event log costs the writers.

Each run writes for a few seconds with 1, 8, 32 and 64 writers (one connection each,
one commit per statement, as fast as they can; the writer threads spread over two
processes, so that one interpreter lock is not the limit) on three workloads, first with the event
log's capture triggers on, then with them disabled, in the same run:

- **chat**: each writer inserts messages into a live session of its own (no two writers
  touch one row);
- **lifecycle**: each writer takes requests through their whole lifecycle (create,
  waiver and queue, accept, start, end: the statements ``bench realtime`` uses);
- **mix**: half the writers of each.

Two more modes run the same writes in the same run: the baseline "at commit" puts back
the numbering used before migration 0008 (ids given in each writer's commit under
realtime.stream's row lock, with a NOTIFY); "decoded" writes the log from the WAL
(db/decoder.py, in a process of its own) with the capture triggers off, the alternative
measured and not taken (docs/decisions.md).

Reported per run: commits/s, commit latency p50/p99 (the statement's round trip, its
commit included). With the log on, a sequencer in each writer process numbers its
events after each commit, as a server does for its own writes (db/sequencer.py); for
every run with a log, a subscriber reading the log (as a server's reader does) reports
how long after each write (its ``at``) it had the event, and a marker written after each
round how far behind the log was then: the rate it kept up with counts that lag in.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from autodispatch.bench.realtime.workload import Member
from autodispatch.bench.write_modes import (
    CAPTURED,
    decoder_running,
    set_decoding,
    set_log,
    set_numbering_at_commit,
)
from autodispatch.bench.writers import MESSAGE, Subscriber, WriterSpec, live_sessions, run_processes
from autodispatch.db.pgoutput import DecodingError

__all__ = ["CAPTURED", "MODES", "Run", "run_writes", "writes"]

WORKLOADS = ("chat", "lifecycle", "mix")
WRITER_COUNTS = (1, 8, 32, 64)
ROUNDS = 3  # turns of every mode per (workload, writers)

# The log numbered after commit by triggers and a sequencer; numbered in each commit (as
# before 0008); written by a decoder from the WAL (db/decoder.py, triggers off); no log.
MODES = ("on", "at commit", "decoded", "off")


@dataclass
class Run:
    workload: str
    writers: int
    mode: str
    commits: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)
    received_ms: list[float] = field(default_factory=list, repr=False)
    round_rates: list[float] = field(default_factory=list)  # commits/s of each round
    # How far behind the log was at the end of each round's window (``Marker``: seconds
    # from a message committed then until a reader had it): a log that falls behind its
    # writers has not kept up with their rate.
    catch_up: list[float] = field(default_factory=list, repr=False)

    @property
    def kept_rate(self) -> float:
        """Commits/s counted until the log held them all: the rate the log kept up with."""
        total = self.seconds + sum(self.catch_up)
        return self.commits / total if total else 0.0

    @property
    def rate(self) -> float:
        return self.commits / self.seconds if self.seconds else 0.0

    def latency_text(self) -> str:
        p50, p99 = self.percentile(self.latencies, 0.5), self.percentile(self.latencies, 0.99)
        return f"{p50:.2f} / {p99:.2f}"

    def percentile(self, values: Sequence[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_writes(
    url: str,
    customers: list[Member],
    mechanics: list[Member],
    *,
    writer_counts: Sequence[int] = WRITER_COUNTS,
    workloads: Sequence[str] = WORKLOADS,
    seconds: float = 2.0,
    rounds: int = ROUNDS,
    warmup: float = 1.0,
    modes: Sequence[str] = MODES,
    processes: int = 2,
    progress: Callable[[str], None] = print,
) -> list[Run]:
    """Every (workload, writers) in each mode; the figures of each, pooled over ``rounds``
    rounds of ``seconds``. The modes of one (workload, writers) take turns, round by round,
    each round in another order: a machine whose speed drifts over minutes (a shared one
    does) then slows every mode alike, not the one that happened to run last. The writers
    of a run are spread over ``processes`` processes (a Python process's writer threads
    share one interpreter lock, which would make the client the bottleneck); with the log
    on, each process numbers its own writes, as each server process does."""
    if "decoded" in modes and not _can_decode(url):
        progress(
            "skipping the decoded mode: this server runs wal_level = replica (decoding needs"
            " wal_level = logical, which takes a restart)"
        )
        modes = [m for m in modes if m != "decoded"]
    sessions = live_sessions(url, customers, mechanics, max(writer_counts))
    runs: list[Run] = []
    try:
        for workload in workloads:
            for count in writer_counts:
                pooled = {mode: Run(workload, count, mode) for mode in modes}
                order = list(modes)
                for turn in range(rounds):
                    for mode in order[turn % len(order) :] + order[: turn % len(order)]:
                        _one_run(url, pooled[mode], sessions, customers, mechanics,
                                 seconds=seconds, warmup=warmup, processes=processes)  # fmt: skip
                for mode in modes:
                    run = pooled[mode]
                    runs.append(run)
                    progress(
                        f"{workload:9} {count:>2} writers, log {mode:9}: {run.rate:8.0f} commits/s"
                        f" (rounds: {', '.join(f'{r:.0f}' for r in run.round_rates)})"
                        + (f"; kept up with {run.kept_rate:8.0f}/s (catch-up"
                           f" {', '.join(f'{c * 1000:.0f}' for c in run.catch_up)} ms)"
                           if run.catch_up else "")
                    )  # fmt: skip
    finally:
        # Each step on its own: one that fails (a slot still held) must not leave the
        # others undone, nor hide the error that ended the run.
        failed: list[str] = []
        steps: list[tuple[Callable[[str, bool], None], bool]] = [
            (set_log, True),
            (set_numbering_at_commit, False),
            (set_decoding, False),
        ]
        for step, on in steps:
            try:
                step(url, on)
            except (psycopg.Error, OSError, DecodingError) as exc:
                failed.append(str(exc))
        if failed:
            progress(f"could not put the database back as it was: {'; '.join(failed)}")
    return runs


def _one_run(
    url: str,
    run: Run,
    sessions: list[dict[str, Any]],
    customers: list[Member],
    mechanics: list[Member],
    *,
    seconds: float,
    warmup: float,
    processes: int,
) -> None:
    """One round of ``run``'s mode: its commits, latencies and received times added."""
    set_log(url, run.mode in ("on", "at commit"))
    set_numbering_at_commit(url, run.mode == "at commit")
    set_decoding(url, run.mode == "decoded")
    share = min(processes, run.writers)
    specs = [
        WriterSpec(
            url,
            run.workload,
            list(range(p, run.writers, share)),
            sessions,
            customers,
            mechanics,
            number=run.mode == "on",
        )
        for p in range(share)
    ]
    marker = Marker(url, sessions[0]) if run.mode != "off" else None
    subscriber = Subscriber(url, marker.body) if marker is not None else None
    with (
        marker or contextlib.nullcontext(),
        subscriber or contextlib.nullcontext(),
        decoder_running(url, run.mode == "decoded"),
    ):
        measured, latencies = run_processes(
            specs, warmup, seconds, marker.write if marker is not None else None
        )
        if marker is not None and subscriber is not None:
            run.catch_up.append(marker.lag(subscriber, numbering=run.mode == "on"))
    run.seconds += measured
    run.commits += len(latencies)
    run.latencies += [x * 1000 for x in latencies]
    run.round_rates.append(len(latencies) / measured)
    if subscriber is not None:
        run.received_ms += subscriber.received_ms


def _can_decode(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute("show wal_level").fetchone()
    return row is not None and row[0] == "logical"


class Marker:
    """A chat message written at the end of a round's measured window, while its writers
    still write: every event committed before it must be in the log before it, so the
    time from its commit until a reader of the log has it is how far behind the log was
    when the window ended (a log that numbers or decodes in commit order cannot hand it
    out earlier)."""

    def __init__(self, url: str, session: dict[str, Any]) -> None:
        self.url = url
        self.params = {**session, "body": f"bench marker {time.monotonic_ns()}"}
        self.body = str(self.params["body"])
        self.committed: float | None = None
        self._conn: psycopg.Connection[Any] | None = None

    def __enter__(self) -> Marker:
        self._conn = psycopg.connect(self.url, autocommit=True)  # ready before the window
        return self

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            self._conn.close()

    def write(self) -> None:
        assert self._conn is not None
        # Timed from before it is sent: a reader may have it before the commit's reply
        # is back here (at commit, the NOTIFY goes with the commit). So the lag includes
        # the marker's own round trip, never less than nothing.
        self.committed = time.monotonic()
        self._conn.execute(MESSAGE, self.params)

    def lag(self, subscriber: Subscriber, *, numbering: bool) -> float:
        """Seconds from the marker's commit until the subscriber had it."""
        assert self._conn is not None and self.committed is not None
        deadline = self.committed + 600
        while not subscriber.marker_seen.wait(0.002):
            if numbering:  # the writers' sequencers have stopped since: number it here
                self._conn.execute("select realtime.sequence(100000)")
            if time.monotonic() > deadline:
                raise SystemExit("the log did not catch up within 10 minutes")
        seen = subscriber.marker_seen_at
        assert seen is not None
        return seen - self.committed


def writes(
    database_url: str | None,
    *,
    writer_counts: Sequence[int] = WRITER_COUNTS,
    workloads: Sequence[str] = WORKLOADS,
    seconds: float = 2.0,
    rounds: int = ROUNDS,
    modes: Sequence[str] = MODES,
    progress: Callable[[str], None] = print,
) -> tuple[list[Run], str]:
    """Run the benchmark on a fresh database: an embedded PostgreSQL of its own (durable
    settings, as ``serve`` runs it) or an empty database at ``database_url``; return the
    runs and the server's version."""
    import tempfile
    from pathlib import Path

    from autodispatch.bench.realtime.workload import create_population
    from autodispatch.db import migrate
    from autodispatch.db.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="autodispatch-bench-writes-") as tmp:
        server = None
        url = database_url
        if url is None:
            progress("starting an embedded PostgreSQL")
            server = EmbeddedPostgres(Path(tmp) / "pg")
            server.start()
            url = server.url("postgres")
        try:
            progress("migrating")
            migrate.upgrade(url)
            progress("creating accounts")
            members = asyncio.run(create_population(url, 40, progress))
            customers = [m for m in members if m.kind == "customer"]
            mechanics = [m for m in members if m.mechanic_id is not None]
            with psycopg.connect(url) as conn:
                version = str(conn.execute("show server_version").fetchone()[0])  # type: ignore[index]
            runs = run_writes(
                url, customers, mechanics,
                writer_counts=writer_counts, workloads=workloads, seconds=seconds,
                rounds=rounds, modes=modes, progress=progress,
            )  # fmt: skip
        finally:
            if server is not None:
                server.stop()
    return runs, version
