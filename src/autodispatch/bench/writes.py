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
import multiprocessing
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from autodispatch.bench.realtime.workload import LIFECYCLE, Member
from autodispatch.config import Settings
from autodispatch.db.sequencer import Sequencer

WORKLOADS = ("chat", "lifecycle", "mix")
SPACING = Settings.realtime_sequence_spacing  # a server's default
WRITER_COUNTS = (1, 8, 32, 64)
ROUNDS = 3  # turns of every mode per (workload, writers)
CAPTURED = ("sessions", "session_assignments", "feature_flags", "session_messages", "probe_pings")

_MESSAGE = """
insert into public.session_messages (session_id, sender_id, sender_name, sender_role, body,
                                     visibility_keys)
values (%(session)s, %(customer)s, 'Bench Driver', 'customer', %(body)s, %(keys)s)"""


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
    # How long after each round's last commit the log held its events (the log's lag
    # then): a log that falls behind its writers has not kept up with their rate.
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


def set_decoding(url: str, on: bool) -> None:
    """Publish the captured tables with their whole old rows and make the decoder's slot
    (or undo both): the log written from the WAL, as db/decoder.py writes it. The slot is
    made new for each decoded round, so it brings only that round's writes."""
    from autodispatch.db.capture import CAPTURED as TABLES
    from autodispatch.db.decoder import PUBLICATION, SLOT, EventDecoder
    from autodispatch.db.slot import Slot

    with psycopg.connect(url, autocommit=True) as conn:
        Slot(SLOT, PUBLICATION).drop(conn)
        for table in TABLES:
            identity = "full" if on else "default"
            conn.execute(f"alter table public.{table} replica identity {identity}")
        conn.execute(f"drop publication if exists {PUBLICATION}")
        if on:
            tables = ", ".join(f"public.{t}" for t in sorted(TABLES))
            conn.execute(f"create publication {PUBLICATION} for table {tables}")
            # The decoded log continues the ids; a new slot starts after what is there.
            conn.execute("update realtime.stream set decoded_lsn = null")
    if on:
        EventDecoder(url).ensure_slot()


def _decoder_process(url: str, ready: Any, finish: Any) -> None:
    """A decoder, as one server process runs it: rounds until told to finish."""
    from autodispatch.db.decoder import EventDecoder

    async def run() -> None:
        decoder = EventDecoder(url, wait=0.05)
        try:
            await decoder.apply_available()
            ready.set()
            while not finish.is_set():
                await decoder.apply_available()
        finally:
            await decoder.close()

    asyncio.run(run())


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
    """Writer threads of a workload, each on a connection of its own: the writers with the
    given indexes (of ``count`` in the run), in this process."""

    def __init__(
        self,
        spec: WriterSpec,
        window: Sequence[float],
        after_commit: Callable[[], None],
    ) -> None:
        self.url = spec.url
        self.indexes = spec.indexes
        self.kinds = {i: self._kind(spec.workload, i) for i in spec.indexes}
        self.sessions = spec.sessions
        self.customers = spec.customers
        self.mechanics = spec.mechanics
        self.after_commit = after_commit
        self.stop = threading.Event()
        self.window = window  # (start, end) on the monotonic clock, shared by the processes
        self.latencies: dict[int, list[float]] = {i: [] for i in spec.indexes}
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._write, args=(i,), daemon=True) for i in spec.indexes
        ]

    @staticmethod
    def _kind(workload: str, i: int) -> str:
        if workload == "mix":
            return "chat" if i % 2 == 0 else "lifecycle"
        return workload

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _write(self, i: int) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                if self.kinds[i] == "chat":
                    self._chat(conn, i)
                else:
                    self._lifecycles(conn, i)
        except Exception as exc:  # reported by the run, not lost in a thread
            self.errors.append(f"writer {i}: {exc!r}")

    def _timed(
        self, conn: psycopg.Connection[Any], sql: str, params: dict[str, Any], i: int
    ) -> Any:
        started = time.perf_counter()
        cur = conn.execute(sql, params)
        row = cur.fetchone() if cur.description is not None else None
        took = time.perf_counter() - started
        self.after_commit()
        if self.window[0] <= time.monotonic() < self.window[1]:
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

    def __init__(self, url: str, marker: str) -> None:
        self.url = url
        self.marker = marker  # the body of a chat message written after the round
        self.marker_seen = threading.Event()
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
                    "select id, extract(epoch from at), record ->> 'body' = %s"
                    " from realtime.events where id > %s order by id limit 10000",
                    (self.marker, position),
                ).fetchall()
                now = time.time()
                for event_id, at, is_marker in rows:
                    if is_marker:
                        self.marker_seen.set()
                    else:
                        self.received_ms.append((now - float(at)) * 1000)
                    position = event_id
                if not rows:
                    for _ in conn.notifies(timeout=0.05, stop_after=1):
                        pass


@dataclass
class WriterSpec:
    """What one writer process needs (it is pickled to a process of its own)."""

    url: str
    workload: str
    indexes: list[int]
    sessions: list[dict[str, Any]]
    customers: list[Member]
    mechanics: list[Member]
    number: bool  # run a sequencer poked after each commit, as a server for its own writes


def _writer_process(
    spec: WriterSpec,
    ready: Any,
    window: Any,
    stop: Any,
    results: Any,
) -> None:
    """One writer process: its writers (and, with the log on, its sequencer, which numbers
    the events of this process's commits right after each, as a server does for its own
    writes), until told to stop; then its latencies and errors go to ``results``."""
    loop = asyncio.new_event_loop()
    done = asyncio.Event()
    sequencer = Sequencer(spec.url, poll_interval=0.05, spacing=SPACING)
    numbering = threading.Thread(
        target=lambda: loop.run_until_complete(sequencer.run(done)), daemon=True
    )

    # A server pokes its sequencer on the loop it runs in (a flag set, no system call);
    # here the writers are threads, and waking the sequencer's loop after every commit
    # (a write to its wake-up pipe, and its thread taking the interpreter lock) cost the
    # writers more than the numbering itself. So a commit wakes it only when no wake-up is
    # on its way: that one, run after this commit, starts a run that sees it.
    pending = threading.Event()

    def wake() -> None:
        pending.clear()
        sequencer.poke()

    def poke() -> None:
        if not pending.is_set():
            pending.set()
            loop.call_soon_threadsafe(wake)

    if spec.number:
        numbering.start()
    writers = Writers(spec, window, poke if spec.number else (lambda: None))
    writers.start()
    ready.set()
    stop.wait()
    writers.finish()
    if spec.number:
        loop.call_soon_threadsafe(done.set)
        loop.call_soon_threadsafe(sequencer.poke)
        numbering.join(timeout=10)
    results.put((writers.latencies, writers.errors))


def run_processes(
    specs: list[WriterSpec], warmup: float, seconds: float
) -> tuple[float, list[float]]:
    """Run writer processes together: warm up, measure for ``seconds`` (every process at
    once), stop. Returns the measured seconds and every commit's latency (s)."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    # The measured window, set once all are ready; read without a lock on each commit.
    window = context.Array("d", [float("inf"), float("inf")], lock=False)
    results = context.Queue()
    readies = [context.Event() for _ in specs]
    processes = [
        context.Process(
            target=_writer_process, args=(spec, ready, window, stop, results), daemon=True
        )
        for spec, ready in zip(specs, readies, strict=True)
    ]
    for process in processes:
        process.start()
    try:
        for ready, process in zip(readies, processes, strict=True):
            while not ready.wait(0.5):
                if not process.is_alive():
                    raise SystemExit(f"a bench writer process died (exit {process.exitcode})")
        start = time.monotonic() + warmup
        window[1] = start + seconds
        window[0] = start
        time.sleep(max(0.0, start + seconds - time.monotonic()) + 0.05)
        stop.set()
        latencies: list[float] = []
        errors: list[str] = []
        for _ in processes:
            mine, failed = results.get(timeout=60)
            latencies += [x for values in mine.values() for x in values]
            errors += failed
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=30)
    if errors:
        raise SystemExit(f"a bench writer failed: {errors[0]}")
    return seconds, latencies


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
        set_log(url, True)
        set_numbering_at_commit(url, False)
        set_decoding(url, False)
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
    marker = f"bench marker {time.monotonic_ns()}"
    subscriber = Subscriber(url, marker) if run.mode != "off" else None
    with subscriber or contextlib.nullcontext(), _decoder(url, run.mode == "decoded"):
        measured, latencies = run_processes(specs, warmup, seconds)
        if subscriber is not None:
            run.catch_up.append(_catch_up(url, sessions[0], marker, subscriber, run.mode))
    run.seconds += measured
    run.commits += len(latencies)
    run.latencies += [x * 1000 for x in latencies]
    run.round_rates.append(len(latencies) / measured)
    if subscriber is not None:
        run.received_ms += subscriber.received_ms


@contextlib.contextmanager
def _decoder(url: str, on: bool) -> Any:
    """A decoder process for the round (when ``on``), running before the writers start."""
    if not on:
        yield
        return
    context = multiprocessing.get_context("spawn")
    ready, finish = context.Event(), context.Event()
    process = context.Process(target=_decoder_process, args=(url, ready, finish), daemon=True)
    process.start()
    try:
        while not ready.wait(0.5):
            if not process.is_alive():
                raise SystemExit(f"the bench decoder process died (exit {process.exitcode})")
        yield
    finally:
        finish.set()
        process.join(timeout=30)


def _catch_up(
    url: str, session: dict[str, Any], marker: str, subscriber: Subscriber, mode: str
) -> float:
    """Write a marker message after the round's writers stopped; seconds until a reader
    of the log had it (and so every event committed before it)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(_MESSAGE, {**session, "body": marker})
        committed = time.monotonic()
        deadline = committed + 600
        while not subscriber.marker_seen.wait(0.002):
            if mode == "on":  # the writers' sequencers have stopped: number it here
                conn.execute("select realtime.sequence(100000)")
            if time.monotonic() > deadline:
                raise SystemExit("the log did not catch up within 10 minutes")
        return time.monotonic() - committed


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
