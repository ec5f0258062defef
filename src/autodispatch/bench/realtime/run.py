"""The run: both routing strategies, measured on the same accounts and workload.

Why one class of ~400 lines: ``Bench`` is the run itself, its phases (setup, windows,
ramp, statements, floor, memory, keys, gateways, baseline) in the order they run, all on
one server, one database and one set of subscriber processes that each phase leaves as
the next expects; the figures go to ``report``, the tables to ``render``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg

from autodispatch.bench.machine import machine
from autodispatch.bench.realtime.clients import LoadGenerator, percentile, raise_fd_limit
from autodispatch.bench.realtime.floor import measure_floor
from autodispatch.bench.realtime.report import (
    LATENCY_LIMIT,
    Memory,
    Progress,
    RealtimeOptions,
    Report,
    StatementCount,
    Window,
)
from autodispatch.bench.realtime.server import (
    LOG_READ,
    NOT_SERVER_STATEMENTS,
    PER_EVENT_PURPOSES,
    CpuClock,
    ServeProcess,
    machine_busy_seconds,
    metric,
    server_percentile,
)
from autodispatch.bench.realtime.workload import (
    SECRET,
    Member,
    Writer,
    create_population,
    join_frames,
)
from autodispatch.identity.tokens import TokenIssuer


class Bench:
    def __init__(self, options: RealtimeOptions, home: Path, progress: Progress) -> None:
        self.options = options
        self.home = home
        self.progress = progress
        self.server = ServeProcess(home, options.database_url)
        self.extra: list[ServeProcess] = []  # more gateways on the same database, at times
        # No keep-alive: uvicorn closes idle connections after 5 s, and a scrape that races
        # that close fails.
        self.http = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_keepalive_connections=0))
        self.report = Report(
            machine=machine(),
            date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            options=options,
            generator_processes=options.processes,
        )
        self.members: list[Member] = []
        self.joins: list[str] = []
        self.gen: LoadGenerator | None = None
        self.writer: Writer | None = None
        self.url = ""
        self.postmaster: int | None = None

    # -- helpers ---------------------------------------------------------------------------
    async def _sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            cur = await conn.execute(query, params or None)
            return await cur.fetchall() if cur.description else []

    def _postgres_pids(self) -> list[int]:
        if self.postmaster is None:
            return []
        with contextlib.suppress(psutil.Error):
            pm = psutil.Process(self.postmaster)
            return [pm.pid, *(c.pid for c in pm.children())]
        return []

    def _generator_pids(self) -> list[int]:
        return [os.getpid(), *(self.gen.pids if self.gen else [])]

    async def _start_server(self, routing: str) -> None:
        profile = self.options.profile_server if routing == "keys" else None
        await asyncio.to_thread(self.server.start, routing, profile)
        if self.gen is not None:
            self.gen.forget()
        if not self.url:
            self.url = await asyncio.to_thread(self.server.db_url)
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            cur = await conn.execute("select pg_backend_pid()")
            row = await cur.fetchone()
            assert row is not None
            # While connected: the backend's parent is the postmaster (None when remote).
            self.postmaster = None
            with contextlib.suppress(psutil.Error):
                self.postmaster = psutil.Process(int(row[0])).ppid()
        self.server.start_head = await self._head()
        if self.writer is not None:
            # The embedded PostgreSQL stops with the last serve process: reconnect.
            await self.writer.stop()
            await self.writer.start()

    async def _stop_server(self) -> None:
        await asyncio.to_thread(self.server.stop)
        if self.gen is not None:
            self.gen.forget()
            await asyncio.sleep(0.5)  # let the subscriber processes notice

    async def _subscribe(self, count: int) -> float:
        assert self.gen is not None and self.writer is not None
        result = await self.gen.resize(count, self.joins)
        self.writer.watching = count
        await asyncio.sleep(1.0)
        return float(result["seconds"])

    async def _head(self) -> int:
        rows = await self._sql("select last_id from realtime.stream where id = 1")
        return int(rows[0][0])

    @property
    def gateways(self) -> list[ServeProcess]:
        return [self.server, *self.extra]

    async def _scrape(self) -> list[dict[tuple[str, tuple[Any, ...]], float]]:
        return [await server.metrics(self.http) for server in self.gateways]

    async def _caught_up(self, timeout: float) -> float | None:
        """Wait until every gateway has routed everything committed so far; return how
        long that took, or None if they did not within ``timeout`` seconds."""
        head = await self._head()
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            positions = [
                (metric(samples, "autodispatch_realtime_log_position"), server.start_head)
                for samples, server in zip(await self._scrape(), self.gateways, strict=True)
            ]
            # The gauge is 0 until a server routes its first event; it started at the head.
            if all(p >= head or (p == 0 and head == start) for p, start in positions):
                waited = time.monotonic() - started
                await asyncio.sleep(0.3)  # frames still in the sockets' queues
                return waited
            await asyncio.sleep(0.05)
        return None

    async def _add_gateways(self, count: int) -> None:
        """Start ``count`` more serve processes on the same database."""
        for _ in range(count):
            extra = ServeProcess(
                self.home, self.options.database_url, name=f"gw{len(self.extra) + 2}"
            )
            await asyncio.to_thread(extra.start, "keys")
            extra.start_head = await self._head()
            self.extra.append(extra)

    async def _remove_gateways(self) -> None:
        for extra in self.extra:
            await asyncio.to_thread(extra.stop)
        self.extra = []

    async def _settle(self, routing: str) -> None:
        """Before counting statements: no backlog left (else start the server afresh)."""
        if await self._caught_up(60.0) is None:
            self.progress(f"{routing}: still behind after 60 s; restarting the server")
            count = len(self.gen.open) if self.gen else 0
            await self._stop_server()
            await self._start_server(routing)
            await self._subscribe(count)

    # -- setup -----------------------------------------------------------------------------
    async def setup(self) -> None:
        options = self.options
        fds = raise_fd_limit()
        needed = options.idle_connections + 500
        if fds < needed:
            raise SystemExit(
                f"this process may open {fds} files; {options.idle_connections} connections"
                f" need about {needed} (raise `ulimit -n`, or lower --idle-connections)"
            )
        self.progress("starting serve (keys)")
        await self._start_server("keys")
        self.report.pg_stat_statements = await self._pg_stat_statements()
        count = max(options.idle_connections, options.subscribers, 100)
        self.progress(f"creating {count} accounts")
        self.members = await create_population(self.url, count, self.progress)
        self.joins = join_frames(self.members)
        self.writer = Writer(self.url, self.members, options.writer_connections)
        await self.writer.start()
        anon = TokenIssuer(SECRET, 3600).anon_key()
        self.gen = LoadGenerator(options.processes, "127.0.0.1", [self.server.port], anon)

    async def _pg_stat_statements(self) -> bool:
        """Make pg_stat_statements available: on the embedded server, preload it (restart)."""
        loaded = await self._sql("show shared_preload_libraries")
        if "pg_stat_statements" not in str(loaded[0][0]):
            if self.options.database_url:
                self.report.notes.append(
                    "pg_stat_statements is not preloaded on --database-url: statement counts"
                    " come from the server's own counter only."
                )
                return False
            self.progress("enabling pg_stat_statements on the embedded PostgreSQL (restart)")
            await self._sql("alter system set shared_preload_libraries = 'pg_stat_statements'")
            await self._stop_server()
            await self._start_server("keys")
        await self._sql("create extension if not exists pg_stat_statements")
        return True

    async def _pg_statements(self, *, background: bool = False) -> int:
        """Statements the server sent since the last reset (pg_stat_statements); with
        ``background``, not its reads of the event log (those are the realtime work
        measured: its timer reads them when idle, events when busy)."""
        rows = await self._sql(
            "select query, calls from pg_stat_statements s"
            " join pg_database d on d.oid = s.dbid where d.datname = current_database()"
        )
        return sum(
            int(calls)
            for query, calls in rows
            if not any(mark in str(query) for mark in NOT_SERVER_STATEMENTS)
            and not (background and all(mark in str(query) for mark in LOG_READ))
        )

    # -- measurements ----------------------------------------------------------------------
    async def window(
        self,
        strategy: str,
        name: str,
        rate: float,
        seconds: float,
        *,
        warmup: float = 2.0,
        drain: float = 20.0,
    ) -> Window:
        assert self.gen is not None and self.writer is not None
        w = Window(strategy, name, len(self.gen.open), rate, gateways=len(self.gateways))
        server_cpu = CpuClock(lambda: [server.pid for server in self.gateways])
        pg_cpu = CpuClock(self._postgres_pids)
        gen_cpu = CpuClock(self._generator_pids)
        writing = asyncio.create_task(self.writer.run(rate, warmup + seconds))
        await asyncio.sleep(warmup)
        await self.gen.reset()
        m0 = await self._scrape()
        c0 = (server_cpu.seconds(), pg_cpu.seconds(), gen_cpu.seconds())
        busy0 = machine_busy_seconds()
        t0 = time.monotonic()
        await writing
        t_written = time.monotonic()
        w.drain_seconds = await self._caught_up(drain)
        m1 = await self._scrape()
        c1 = (server_cpu.seconds(), pg_cpu.seconds(), gen_cpu.seconds())
        busy1 = machine_busy_seconds()
        wall = time.monotonic() - t0
        stats = await self.gen.collect()
        w.seconds = t_written - t0
        w.elapsed = wall
        # Every gateway reads every event: count them on the first; the rest add up.
        w.events = int(
            metric(m1[0], "autodispatch_realtime_events_read_total")
            - metric(m0[0], "autodispatch_realtime_events_read_total")
        )
        w.server_delivered = int(
            sum(
                metric(after, "autodispatch_realtime_delivered_total")
                - metric(before, "autodispatch_realtime_delivered_total")
                for before, after in zip(m0, m1, strict=True)
            )
        )
        w.received = stats["received"]
        w.p50_ms = percentile(stats["hist"], 0.50)
        w.p99_ms = percentile(stats["hist"], 0.99)
        w.max_ms = stats["max"] * 1000
        w.server_p50_ms = server_percentile(m0, m1, 0.50)
        w.server_p99_ms = server_percentile(m0, m1, 0.99)
        read = "autodispatch_realtime_commit_to_read_seconds"
        w.read_p50_ms = server_percentile(m0, m1, 0.50, read)
        w.server_cpu = CpuClock.percent(c0[0], c1[0], wall)
        w.postgres_cpu = CpuClock.percent(c0[1], c1[1], wall)
        w.generator_cpu = CpuClock.percent(c0[2], c1[2], wall)
        w.machine_cpu = 100 * (busy1 - busy0) / wall
        w.disconnects = sum(stats["closed"].values())
        w.kept_up = w.drain_seconds is not None and w.drain_seconds <= self.options.keep_up_seconds
        w.within_limit = w.kept_up and w.p99_ms <= LATENCY_LIMIT * 1000 and not w.disconnects
        self.report.windows.append(w)
        self.progress(
            f"{strategy} {name}: {w.subscribers} subscribers, {w.events_per_s:.0f} events/s,"
            f" {w.deliveries_per_s:.0f} deliveries/s, p50 {w.p50_ms:.1f} ms,"
            f" p99 {w.p99_ms:.1f} ms, max {w.max_ms:.0f} ms, server CPU {w.server_cpu:.0f}%,"
            f" other processes {w.other_cpu:.0f}%" + ("" if w.kept_up else ", fell behind")
        )
        return w

    async def ramp(
        self, strategy: str, start: float, factor: float, steps: int, seconds: float
    ) -> None:
        """Raise the event rate step by step until the server no longer keeps up."""
        rate = start
        for step in range(steps):
            w = await self.window(strategy, f"ramp {step + 1}", rate, seconds)
            if not w.kept_up:
                return
            rate *= factor

    async def statements(self, strategy: str) -> None:
        assert self.gen is not None and self.writer is not None
        await self._settle(strategy)
        s = StatementCount(strategy, len(self.gen.open))
        seconds = self.options.statements_seconds
        if self.report.pg_stat_statements:
            # What the server sends without events (its background jobs, the reader's
            # timer), over as long as the writes will take: subtracted from the count.
            await self._sql("select pg_stat_statements_reset()")
            await asyncio.sleep(seconds)
            s.pg_background = await self._pg_statements(background=True)
            await self._sql("select pg_stat_statements_reset()")
        m0 = await self.server.metrics(self.http)
        await self.writer.run(self.options.statements_rate, seconds)
        await self._caught_up(5.0)
        m1 = await self.server.metrics(self.http)
        if self.report.pg_stat_statements:
            s.pg_server = await self._pg_statements()
        s.events = int(
            metric(m1, "autodispatch_realtime_events_read_total")
            - metric(m0, "autodispatch_realtime_events_read_total")
        )
        s.realtime_counter = int(
            sum(
                metric(m1, "autodispatch_realtime_db_statements_total", purpose=p)
                - metric(m0, "autodispatch_realtime_db_statements_total", purpose=p)
                for p in PER_EVENT_PURPOSES
            )
        )
        self.report.statements.append(s)
        pg = s.pg_per_event
        self.progress(
            f"{strategy} statements at {s.subscribers} subscribers: {s.events} events,"
            f" {s.counter_per_event:.2f} realtime statements/event"
            + (f", {pg:.2f} server statements/event (pg_stat_statements)" if pg is not None else "")
        )

    async def floor(self) -> None:
        """The machine's floor for the workload's biggest events: a general request
        reaches every mechanic and admin subscribed (floor.py). Measured while the
        subscribers stay connected and idle, as they are between events."""
        assert self.gen is not None
        pool = sum(1 for i in self.gen.open if self.members[i].kind != "customer")
        self.progress(f"floor: bursts to {pool} loopback sockets, nothing else")
        floor = await asyncio.to_thread(measure_floor, pool, processes=self.options.processes)
        self.report.floor = floor
        self.progress(
            f"floor: median frame {floor.p50_ms:.1f} ms after its burst started, p99"
            f" {floor.p99_ms:.1f} ms; a burst takes {floor.burst_ms:.1f} ms to write"
        )

    async def memory(self, count: int) -> None:
        await asyncio.sleep(2.0)
        before = psutil.Process(self.server.pid).memory_info().rss
        seconds = await self._subscribe(count)
        await asyncio.sleep(3.0)
        after = psutil.Process(self.server.pid).memory_info().rss
        m = Memory(count, before, after, seconds)
        self.report.memory.append(m)
        self.progress(
            f"idle: {count} connections opened and joined in {seconds:.1f} s;"
            f" server RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB,"
            f" {m.per_connection / 1024:.1f} KiB per connection"
        )

    # -- the two strategies ------------------------------------------------------------------
    async def run_keys(self) -> None:
        o = self.options
        self.progress("keys: warming up")
        await self._subscribe(50)
        await self.window("keys", "warm-up", 20, 3.0)
        self.report.windows.pop()
        await self._subscribe(0)
        await self.memory(o.idle_connections)
        await self.statements("keys")
        await self._subscribe(o.subscribers)
        self.progress(f"keys: latency at {o.subscribers} subscribers, {o.rate:g} events/s")
        await self.window("keys", "latency", o.rate, o.duration, warmup=3.0, drain=60.0)
        await self._settle("keys")
        await self.floor()
        if o.latency_gateways > 1:
            await self.latency_on_gateways(o.latency_gateways)
        self.progress(f"keys: ramp from {o.ramp_start:g} events/s")
        await self.ramp("keys", o.ramp_start, o.ramp_factor, o.ramp_steps, o.step_seconds)
        await self._subscribe(100)
        await self.statements("keys")

    async def latency_on_gateways(self, count: int) -> None:
        """The latency figure again, the subscribers spread over ``count`` gateways."""
        assert self.gen is not None
        o = self.options
        self.progress(f"keys: latency with {count} gateway processes")
        await self._subscribe(0)
        await self._add_gateways(count - 1)
        self.gen.ports = [server.port for server in self.gateways]
        try:
            await self._subscribe(o.subscribers)
            name = f"latency, {count} gateways"
            await self.window("keys", name, o.rate, o.duration, warmup=3.0, drain=60.0)
            await self._settle("keys")
            await self._subscribe(0)
        finally:
            self.gen.ports = [self.server.port]
            await self._remove_gateways()
        await self._subscribe(o.subscribers)

    async def run_baseline(self) -> None:
        o = self.options
        await self._stop_server()
        self.progress("starting serve (per_subscriber_sql)")
        await self._start_server("per_subscriber_sql")
        await self._subscribe(100)
        await self.statements("per_subscriber_sql")
        await self._subscribe(o.subscribers)
        self.progress(f"baseline: ramp from {o.baseline_ramp_start:g} events/s")
        await self.ramp(
            "per_subscriber_sql",
            o.baseline_ramp_start,
            o.baseline_ramp_factor,
            o.baseline_ramp_steps,
            o.baseline_step_seconds,
        )
        # The last ramp step may have left a backlog: start afresh for the latency figure.
        await self._stop_server()
        await self._start_server("per_subscriber_sql")
        await self._subscribe(o.subscribers)
        self.progress(f"baseline: latency at {o.subscribers} subscribers, {o.rate:g} events/s")
        await self.window(
            "per_subscriber_sql", "latency", o.rate, o.baseline_duration, warmup=0.0, drain=120.0
        )
        await self._stop_server()
        await self._start_server("per_subscriber_sql")
        await self._subscribe(o.idle_connections)
        await self.statements("per_subscriber_sql")

    async def close(self) -> None:
        if self.gen is not None:
            await asyncio.to_thread(self.gen.stop)
        await self._remove_gateways()
        if self.writer is not None:
            await self.writer.stop()
        await self.http.aclose()
        await asyncio.to_thread(self.server.stop)


async def _run(options: RealtimeOptions, home: Path, progress: Progress) -> Report:
    bench = Bench(options, home, progress)
    try:
        await bench.setup()
        await bench.run_keys()
        if options.baseline:
            await bench.run_baseline()
    finally:
        await bench.close()
    return bench.report


def realtime(options: RealtimeOptions, progress: Progress) -> Report:
    """Run the whole benchmark; the servers and subscriber processes are stopped after."""
    with tempfile.TemporaryDirectory(prefix="autodispatch-bench-rt-") as tmp:
        home = Path(tmp)
        home.chmod(0o755)  # the embedded PostgreSQL may run as another user
        return asyncio.run(_run(options, home, progress))
