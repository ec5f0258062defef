"""`autodispatch bench writes`: what the event log costs the writers.

Each run writes for a few seconds with 1, 8, 32 and 64 writers (one connection each,
one commit per statement, as fast as they can) on three workloads, first with the event
log's capture triggers on, then with them disabled, in the same run:

- **chat**: each writer inserts messages into a live session of its own (no two writers
  touch one row);
- **lifecycle**: each writer takes requests through their whole lifecycle (create,
  waiver and queue, accept, start, end: the statements ``bench realtime`` uses);
- **mix**: half the writers of each.

A third mode, the baseline "at commit", puts back the numbering used before migration
0008 (ids given in each writer's commit under realtime.stream's row lock, with a NOTIFY)
for the same writes in the same run.

Reported per run: commits/s, commit latency p50/p99 (the statement's round trip, its
commit included). With the log on, a sequencer in the writers' process numbers their
events after each commit, as a server does for its own writes (db/sequencer.py); for
the fastest run with the log on, a subscriber reading the log (as a server's reader
does) reports how long after each write (its ``at``) it had the event; so does the
fastest "at commit" run, for comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from autodispatch.db.sequencer import Sequencer
from autodispatch.ops.bench_realtime.workload import LIFECYCLE, Member

WORKLOADS = ("chat", "lifecycle", "mix")
WRITER_COUNTS = (1, 8, 32, 64)
CAPTURED = ("sessions", "session_assignments", "feature_flags", "session_messages", "probe_pings")

_MESSAGE = """
insert into public.session_messages (session_id, sender_id, sender_name, sender_role, body,
                                     visibility_keys)
values (%(session)s, %(customer)s, 'Bench Driver', 'customer', %(body)s, %(keys)s)"""


MODES = ("on", "at commit", "off")  # the log numbered after commit; before 0008; no log


@dataclass
class Run:
    workload: str
    writers: int
    mode: str
    commits: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)
    received_ms: list[float] = field(default_factory=list, repr=False)

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


# The numbering before migration 0008, for the baseline mode "at commit": a deferred
# trigger takes realtime.stream's row lock and sends a NOTIFY in every writer's commit.
_AT_COMMIT = """
create function realtime.bench_assign_id_at_commit() returns trigger
language plpgsql security definer set search_path = '' as $$
declare
  v_id bigint;
begin
  update realtime.stream set last_id = last_id + 1 where id = 1 returning last_id into v_id;
  update realtime.events set id = v_id, at = clock_timestamp() where seq = new.seq;
  perform pg_notify('autodispatch_events', '');
  return null;
end
$$;
create constraint trigger bench_assign_id_at_commit after insert on realtime.events
  deferrable initially deferred
  for each row execute function realtime.bench_assign_id_at_commit();
"""
_NOT_AT_COMMIT = """
drop trigger if exists bench_assign_id_at_commit on realtime.events;
drop function if exists realtime.bench_assign_id_at_commit();
"""


def set_numbering_at_commit(url: str, on: bool) -> None:
    """Put back (or remove) the numbering inside each writer's commit, as before 0008."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(_NOT_AT_COMMIT)
        if on:
            conn.execute(_AT_COMMIT)


def set_log(url: str, on: bool) -> None:
    """Enable or disable the event log's capture triggers (the writers' only link to it)."""
    verb = "enable" if on else "disable"
    with psycopg.connect(url, autocommit=True) as conn:
        for table in CAPTURED:
            conn.execute(f"alter table public.{table} {verb} trigger a_realtime_capture")


def live_sessions(
    url: str, customers: list[Member], mechanics: list[Member], count: int
) -> list[dict[str, Any]]:
    """``count`` live sessions (one per chat writer), made with the lifecycle's statements."""
    sessions: list[dict[str, Any]] = []
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(count):
            customer, mechanic = customers[i % len(customers)], mechanics[i % len(mechanics)]
            ids: dict[str, Any] = {
                "customer": customer.user_id,
                "workshop": None,
                "mechanic": mechanic.mechanic_id,
            }
            for step, sql in LIFECYCLE[:4]:  # create, queue, accept, start
                row = conn.execute(sql, ids).fetchone()
                assert row is not None, step
                ids["session"] = ids.get("session") or row[0]
                if step == "queue":
                    ids["assignment"] = row[0]
            ids["keys"] = [f"user:{customer.user_id}", f"mechanic:{mechanic.mechanic_id}"]
            sessions.append(ids)
    return sessions


class Writers:
    """``count`` writer threads of a workload, each on a connection of its own."""

    def __init__(
        self,
        url: str,
        workload: str,
        count: int,
        sessions: list[dict[str, Any]],
        customers: list[Member],
        mechanics: list[Member],
        after_commit: Callable[[], None],
    ) -> None:
        self.url = url
        self.kinds = [self._kind(workload, i) for i in range(count)]
        self.sessions = sessions
        self.customers = customers
        self.mechanics = mechanics
        self.after_commit = after_commit
        self.stop = threading.Event()
        self.measuring = threading.Event()
        self.latencies: list[list[float]] = [[] for _ in range(count)]
        self.errors: list[str] = []

    @staticmethod
    def _kind(workload: str, i: int) -> str:
        if workload == "mix":
            return "chat" if i % 2 == 0 else "lifecycle"
        return workload

    def run(self, warmup: float, seconds: float) -> float:
        threads = [
            threading.Thread(target=self._write, args=(i,), daemon=True)
            for i in range(len(self.kinds))
        ]
        for t in threads:
            t.start()
        time.sleep(warmup)
        self.measuring.set()
        started = time.perf_counter()
        time.sleep(seconds)
        self.measuring.clear()
        elapsed = time.perf_counter() - started
        self.stop.set()
        for t in threads:
            t.join(timeout=30)
        if self.errors:
            raise SystemExit(f"a bench writer failed: {self.errors[0]}")
        return elapsed

    def _write(self, i: int) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                if self.kinds[i] == "chat":
                    self._chat(conn, i)
                else:
                    self._lifecycles(conn, i)
        except Exception as exc:  # reported by run(), not lost in a thread
            self.errors.append(f"writer {i}: {exc!r}")

    def _timed(
        self, conn: psycopg.Connection[Any], sql: str, params: dict[str, Any], i: int
    ) -> Any:
        started = time.perf_counter()
        cur = conn.execute(sql, params)
        row = cur.fetchone() if cur.description is not None else None
        took = time.perf_counter() - started
        self.after_commit()
        if self.measuring.is_set():
            self.latencies[i].append(took)
        return row

    def _chat(self, conn: psycopg.Connection[Any], i: int) -> None:
        params = dict(self.sessions[i])
        n = 0
        while not self.stop.is_set():
            params["body"] = f"message {n} from writer {i}"
            self._timed(conn, _MESSAGE, params, i)
            n += 1

    def _lifecycles(self, conn: psycopg.Connection[Any], i: int) -> None:
        rng = random.Random(i)
        while not self.stop.is_set():
            ids: dict[str, Any] = {
                "customer": rng.choice(self.customers).user_id,
                "workshop": None,
                "mechanic": rng.choice(self.mechanics).mechanic_id,
            }
            for step, sql in LIFECYCLE:
                row = self._timed(conn, sql, ids, i)
                if row is None:
                    raise RuntimeError(f"step {step} changed nothing")
                if step == "create":
                    ids["session"] = row[0]
                elif step == "queue":
                    ids["assignment"] = row[0]


class Subscriber:
    """Reads the log in order as a server's reader does, woken by the sequencer's NOTIFY,
    and records how long after its ``at`` each event was in hand."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.received_ms: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Subscriber:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            position = conn.execute("select last_id from realtime.stream").fetchone()[0]  # type: ignore[index]
            conn.execute("listen autodispatch_events")
            while not self.stop.is_set():
                rows = conn.execute(
                    "select id, extract(epoch from at) from realtime.events where id > %s"
                    " order by id limit 10000",
                    (position,),
                ).fetchall()
                now = time.time()
                for event_id, at in rows:
                    self.received_ms.append((now - float(at)) * 1000)
                    position = event_id
                if not rows:
                    for _ in conn.notifies(timeout=0.05, stop_after=1):
                        pass


async def _sequencing(
    url: str, stop: asyncio.Event, ready: threading.Event, box: list[Sequencer]
) -> None:
    sequencer = Sequencer(url, poll_interval=0.05)
    box.append(sequencer)
    ready.set()
    await sequencer.run(stop)


def run_writes(
    url: str,
    customers: list[Member],
    mechanics: list[Member],
    *,
    writer_counts: Sequence[int] = WRITER_COUNTS,
    workloads: Sequence[str] = WORKLOADS,
    seconds: float = 4.0,
    warmup: float = 1.0,
    modes: Sequence[str] = MODES,
    progress: Callable[[str], None] = print,
) -> list[Run]:
    """Every (workload, writers) in each mode; the figures of each run."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()
    box: list[Sequencer] = []
    thread = threading.Thread(
        target=lambda: loop.run_until_complete(_sequencing(url, stop, ready, box)), daemon=True
    )
    thread.start()
    ready.wait(10)
    sequencer = box[0]

    def poke() -> None:
        loop.call_soon_threadsafe(sequencer.poke)

    sessions = live_sessions(url, customers, mechanics, max(writer_counts))
    runs: list[Run] = []
    try:
        for mode in modes:
            set_log(url, mode != "off")
            set_numbering_at_commit(url, mode == "at commit")
            for workload in workloads:
                for count in writer_counts:
                    run = Run(workload, count, mode)
                    writers = Writers(
                        url, workload, count, sessions, customers, mechanics,
                        poke if mode == "on" else (lambda: None),
                    )  # fmt: skip
                    subscriber = Subscriber(url) if mode != "off" else None
                    with subscriber or contextlib.nullcontext():
                        run.seconds = writers.run(warmup, seconds)
                    run.latencies = [x * 1000 for mine in writers.latencies for x in mine]
                    run.commits = len(run.latencies)
                    if subscriber is not None:
                        run.received_ms = subscriber.received_ms
                    runs.append(run)
                    progress(
                        f"{workload:9} {count:>2} writers, log {mode:9}: {run.rate:8.0f} commits/s"
                    )
    finally:
        set_log(url, True)
        set_numbering_at_commit(url, False)
        loop.call_soon_threadsafe(stop.set)
        loop.call_soon_threadsafe(sequencer.poke)
        thread.join(timeout=10)
        loop.close()
    return runs


def writes(
    database_url: str | None,
    *,
    writer_counts: Sequence[int] = WRITER_COUNTS,
    workloads: Sequence[str] = WORKLOADS,
    seconds: float = 4.0,
    modes: Sequence[str] = MODES,
    progress: Callable[[str], None] = print,
) -> tuple[list[Run], str]:
    """Run the benchmark on a fresh database: an embedded PostgreSQL of its own (durable
    settings, as ``serve`` runs it) or an empty database at ``database_url``; return the
    runs and the server's version."""
    import tempfile
    from pathlib import Path

    from autodispatch.db import migrate
    from autodispatch.db.embedded import EmbeddedPostgres
    from autodispatch.ops.bench_realtime.workload import create_population

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
                modes=modes, progress=progress,
            )  # fmt: skip
        finally:
            if server is not None:
                server.stop()
    return runs, version
