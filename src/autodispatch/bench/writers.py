"""The writers of `bench writes`: threads on connections of their own, spread over
processes (one interpreter lock would otherwise be the limit), each writing one workload
as fast as it can; and the subscriber that reads the log as a server's reader does."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from autodispatch.bench.realtime.workload import LIFECYCLE, Member
from autodispatch.config import Settings
from autodispatch.db.sequencer import Sequencer

SPACING = Settings.realtime_sequence_spacing  # a server's default

MESSAGE = """
insert into public.session_messages (session_id, sender_id, sender_name, sender_role, body,
                                     visibility_keys)
values (%(session)s, %(customer)s, 'Bench Driver', 'customer', %(body)s, %(keys)s)"""


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
            self._timed(conn, MESSAGE, params, i)
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
        self.marker_seen_at: float | None = None  # on the monotonic clock
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
                now, now_monotonic = time.time(), time.monotonic()
                for event_id, at, is_marker in rows:
                    if is_marker:
                        self.marker_seen_at = now_monotonic
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
    specs: list[WriterSpec],
    warmup: float,
    seconds: float,
    at_end: Callable[[], None] | None = None,
) -> tuple[float, list[float]]:
    """Run writer processes together: warm up, measure for ``seconds`` (every process at
    once), call ``at_end`` while the writers still write, stop. Returns the measured
    seconds and every commit's latency (s)."""
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
        time.sleep(max(0.0, start + seconds - time.monotonic()))
        if at_end is not None:
            at_end()
        time.sleep(0.05)
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
