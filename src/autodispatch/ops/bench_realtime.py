"""Benchmark: realtime delivery (``autodispatch bench realtime``), a command that prints figures.

A real ``autodispatch serve`` runs in its own process (on an embedded PostgreSQL in a
temporary home, or on ``--database-url``). The load runs in other processes: subscriber
processes (``multiprocessing``) hold the WebSocket connections, speaking the Supabase
Realtime protocol (vsn 1.0.0) through the ``websockets`` package's sans-I/O client on
plain asyncio transports, so that a received frame costs the generator a few
microseconds; this process writes the events straight into the database as the service
(one SQL statement per lifecycle step; the triggers write the event log), at a target
rate, from several connections.

The same run measures two routing strategies of the gateway, on the same accounts and
workload: ``keys`` (the visibility-key index) and ``per_subscriber_sql`` (one SQL
visibility query per subscriber per event, the hosted service's method; see
``realtime/baseline.py``). Figures:

- commit-to-received latency: ``data.commit_timestamp`` (set in the committing
  transaction) against the subscriber process's clock when the frame arrives;
- a ramp of event rates until the server falls behind: the most deliveries per second it
  kept up with, and the most with p99 at or under 100 ms;
- server memory per idle joined connection (RSS of the serve process before and after);
- database statements per event at 100 and at many subscribers, from the server's own
  counter (``autodispatch_realtime_db_statements_total``) and from ``pg_stat_statements``.

The workload is a marketplace: independent mechanics and workshop mechanics (20
workshops) watch the queue (``session_assignments``, unfiltered) and their own sessions
(``sessions``, ``mechanic_id=eq.<id>``); customers watch their own requests (both tables,
``customer_id=eq.<id>``); a few admins watch everything. Requests are general (every
mechanic may take them) or for one workshop, and go through their lifecycle: created,
queued, accepted, started, completed.

This module must not import ``autodispatch.realtime`` (ops is the lower layer): the
client frames are written here with ``json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from autodispatch.config import Settings
from autodispatch.db.database import Database
from autodispatch.identity.accounts import Accounts
from autodispatch.identity.tokens import TokenIssuer

Progress = Callable[[str], None]

SECRET = "bench-realtime-secret-" + "r" * 32
TOPIC = "realtime:dispatch"
WORKSHOPS = 20
ADMINS = 5
# Subscribers other than the admins, by share: a prefix of any length keeps the mix.
MIX = (("independent", 0.30), ("workshop", 0.30), ("customer", 0.40))
WORKSHOP_REQUEST_SHARE = 0.4  # the rest are general requests (every mechanic's pool)
LATENCY_LIMIT = 0.100  # a ramp step is "within the limit" when its p99 is at most this
WRITER_MARK = "/* bench-writer */"  # inside each writer statement (a leading one is dropped)

# --------------------------------------------------------------------------------------
# Options and results
# --------------------------------------------------------------------------------------


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
    ramp_steps: int = 9
    step_seconds: float = 10.0  # seconds measured per ramp step
    keep_up_seconds: float = 1.0
    statements_rate: float = 10.0  # events/s while counting statements
    statements_seconds: float = 10.0
    processes: int = 2  # subscriber processes
    writer_connections: int = 12
    database_url: str | None = None
    baseline: bool = True
    baseline_ramp_start: float = 0.5
    baseline_ramp_factor: float = 2.0
    baseline_ramp_steps: int = 5
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
    server_cpu: float = float("nan")  # percent of one core
    postgres_cpu: float = float("nan")
    generator_cpu: float = float("nan")
    disconnects: int = 0
    drain_seconds: float | None = None  # after the writes stopped; None: never caught up
    kept_up: bool = False  # caught up within keep_up_seconds of the last write
    within_limit: bool = False  # kept up, p99 <= LATENCY_LIMIT, nobody disconnected

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
    pg_background: int | None = None  # ... of which the expiry job and the LISTEN liveness

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
            raw.update(events_per_s=w.events_per_s, deliveries_per_s=w.deliveries_per_s)
        return data


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


# --------------------------------------------------------------------------------------
# Subscriber processes: WebSocket clients on asyncio transports, websockets' sans-I/O
# protocol doing the handshake, the framing and the ping/pong.
# --------------------------------------------------------------------------------------

_POSTGRES_CHANGES = b'"event":"postgres_changes"'
_COMMIT_TS = b'"commit_timestamp":"'
# Latency histogram: 0.1 ms buckets up to 10 s, then 10 ms buckets up to 300 s.
_FINE = 100_000
_HIST_LAST = _FINE + 29_000


def _bucket(latency: float) -> int:
    if latency < 10.0:
        return max(int(latency * 10_000), 0)
    return min(_FINE + int((latency - 10.0) * 100), _HIST_LAST)


def _bucket_ms(bucket: int) -> float:
    """The middle of a bucket, in milliseconds."""
    if bucket < _FINE:
        return (bucket + 0.5) / 10
    return 10_000 + (bucket - _FINE + 0.5) * 10


HEARTBEAT_SECONDS = 25.0  # as the stock clients


class _Stats:
    def __init__(self) -> None:
        self.received = 0
        self.control = 0
        self.hist = [0] * (_HIST_LAST + 1)
        self.max = 0.0
        self.closed: Counter[str] = Counter()
        self.timestamps: dict[bytes, float] = {}

    def timestamp(self, raw: bytes) -> float:
        ts = self.timestamps.get(raw)
        if ts is None:
            if len(self.timestamps) > 50_000:
                self.timestamps.clear()
            ts = datetime.fromisoformat(raw.decode()).timestamp()
            self.timestamps[raw] = ts
        return ts

    def snapshot(self, open_count: int) -> dict[str, Any]:
        return {
            "received": self.received,
            "control": self.control,
            "hist": {i: n for i, n in enumerate(self.hist) if n},
            "max": self.max,
            "closed": dict(self.closed),
            "open": open_count,
        }


class _Subscriber(asyncio.Protocol):
    def __init__(self, client: _Client, index: int, url: str, join: str) -> None:
        self.client = client
        self.index = index
        self.ws = ClientProtocol(parse_uri(url), max_size=None)
        self.join_frame = join
        self.transport: asyncio.Transport | None = None
        self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closing = False
        self.next_heartbeat = time.monotonic() + HEARTBEAT_SECONDS * random.random()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.ws.send_request(self.ws.connect())
        self.flush()

    def flush(self) -> None:
        if self.transport is None:
            return
        for chunk in self.ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
            else:  # the protocol is done writing (closing handshake)
                self.transport.close()
                return

    def send(self, text: str) -> None:
        self.ws.send_text(text.encode())
        self.flush()

    def data_received(self, data: bytes) -> None:
        now = time.time()
        stats = self.client.stats
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Response):
                if event.status_code != 101:
                    self._fail(f"handshake refused: HTTP {event.status_code} {event.body!r}")
                else:
                    self.send(self.join_frame)
                continue
            if not isinstance(event, Frame) or event.opcode is not Opcode.TEXT:
                continue
            frame = event.data if isinstance(event.data, bytes) else bytes(event.data)
            if frame.find(_POSTGRES_CHANGES, 0, 200) >= 0:
                start = frame.find(_COMMIT_TS) + len(_COMMIT_TS)
                end = frame.find(b'"', start)
                latency = now - stats.timestamp(frame[start:end])
                stats.received += 1
                stats.hist[_bucket(latency)] += 1
                if latency > stats.max:
                    stats.max = latency
            else:
                stats.control += 1
                self._control(json.loads(frame))
        self.flush()

    def _control(self, msg: dict[str, Any]) -> None:
        if self.joined.done():
            return
        payload = msg.get("payload") or {}
        if msg.get("event") == "phx_reply" and msg.get("ref") == "1":
            if payload.get("status") != "ok":
                self._fail(f"join refused: {payload}")
        elif msg.get("event") == "system":
            if payload.get("status") == "ok":
                self.joined.set_result(None)  # "Subscribed to PostgreSQL": live from now
            else:
                self._fail(f"join failed: {payload}")

    def _fail(self, why: str) -> None:
        if not self.joined.done():
            self.joined.set_exception(RuntimeError(why))

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.subscribers.pop(self.index, None)
        if not self.closing:
            self.client.stats.closed[str(self.ws.close_code or "dropped")] += 1
        self._fail(f"connection lost ({exc or self.ws.close_code})")

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.ws.send_close(1000)
            self.flush()
            self.transport.close()


class _Client:
    """One subscriber process: opens, holds and closes connections on request."""

    def __init__(self, host: str, port: int, url: str) -> None:
        self.host = host
        self.port = port
        self.url = url
        self.stats = _Stats()
        self.subscribers: dict[int, _Subscriber] = {}

    async def open(self, items: list[tuple[int, str]]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        gate = asyncio.Semaphore(64)
        errors: list[str] = []

        async def one(index: int, join: str) -> None:
            async with gate:
                try:
                    _, sub = await loop.create_connection(
                        lambda: _Subscriber(self, index, self.url, join), self.host, self.port
                    )
                    self.subscribers[index] = sub
                    await asyncio.wait_for(sub.joined, timeout=60)
                except (OSError, RuntimeError, TimeoutError) as exc:
                    errors.append(f"subscriber {index}: {exc}")
                    if index in self.subscribers:
                        self.subscribers.pop(index).close()

        await asyncio.gather(*(one(i, join) for i, join in items))
        return {
            "opened": len(items) - len(errors),
            "errors": errors[:5],
            "failed": len(errors),
            "seconds": time.perf_counter() - started,
        }

    def close(self, indices: Iterable[int]) -> dict[str, Any]:
        for index in indices:
            sub = self.subscribers.pop(index, None)
            if sub is not None:
                sub.close()
        return {"open": len(self.subscribers)}

    async def heartbeats(self) -> None:
        frame = json.dumps({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "hb"})
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for sub in list(self.subscribers.values()):
                if now >= sub.next_heartbeat and sub.joined.done():
                    sub.next_heartbeat = now + HEARTBEAT_SECONDS
                    sub.send(frame)


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _subscriber_process(conn: Connection, host: str, port: int, url: str) -> None:
    """Entry point of a subscriber process: serve the parent's commands until "quit"."""
    _raise_fd_limit()
    asyncio.run(_serve_commands(conn, _Client(host, port, url)))


async def _serve_commands(conn: Connection, client: _Client) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    loop.add_reader(conn.fileno(), lambda: commands.put_nowait(conn.recv()))
    heartbeats = asyncio.create_task(client.heartbeats())
    try:
        while True:
            command = await commands.get()
            kind = command[0]
            if kind == "open":
                reply: Any = await client.open(command[1])
            elif kind == "close":
                reply = client.close(command[1])
            elif kind == "reset":
                client.stats = _Stats()
                reply = {"open": len(client.subscribers)}
            elif kind == "stats":
                reply = client.stats.snapshot(len(client.subscribers))
            else:  # quit
                client.close(list(client.subscribers))
                await asyncio.sleep(0.2)
                conn.send({"bye": True})
                return
            conn.send(reply)
    finally:
        heartbeats.cancel()


class LoadGenerator:
    """The parent's handle on the subscriber processes; subscriber i lives in process i % n."""

    def __init__(self, processes: int, host: str, port: int, anon_key: str) -> None:
        self.url = f"ws://{host}:{port}/realtime/v1/websocket?apikey={anon_key}&vsn=1.0.0"
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_subscriber_process, args=(child, host, port, self.url), daemon=True
            )
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)
        self.open: set[int] = set()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def _ask_all(self, commands: list[tuple[Any, ...] | None]) -> list[Any]:
        loop = asyncio.get_running_loop()

        def ask(pipe: Connection, command: tuple[Any, ...]) -> Any:
            pipe.send(command)
            return pipe.recv()

        jobs = [
            loop.run_in_executor(None, ask, pipe, command)
            for pipe, command in zip(self.pipes, commands, strict=True)
            if command is not None
        ]
        return list(await asyncio.gather(*jobs))

    def _split(self, indices: Iterable[int]) -> list[list[int]]:
        parts: list[list[int]] = [[] for _ in self.pipes]
        for i in indices:
            parts[i % len(self.pipes)].append(i)
        return parts

    async def resize(self, count: int, joins: list[str]) -> dict[str, Any]:
        """Hold subscribers 0..count-1: open the missing ones, close the others."""
        surplus = sorted(i for i in self.open if i >= count)
        if surplus:
            await self._ask_all(
                [("close", part) if part else None for part in self._split(surplus)]
            )
            self.open -= set(surplus)
        missing = [i for i in range(count) if i not in self.open]
        result: dict[str, Any] = {"opened": 0, "failed": 0, "errors": [], "seconds": 0.0}
        if missing:
            started = time.perf_counter()
            replies = await self._ask_all(
                [
                    ("open", [(i, joins[i]) for i in part]) if part else None
                    for part in self._split(missing)
                ]
            )
            for reply in replies:
                result["opened"] += reply["opened"]
                result["failed"] += reply["failed"]
                result["errors"] += reply["errors"]
            result["seconds"] = time.perf_counter() - started
            self.open |= set(missing)
        if result["failed"]:
            raise SystemExit(
                f"{result['failed']} subscribers could not join, e.g. {result['errors'][:3]}"
            )
        return result

    def forget(self) -> None:
        """After a server restart every connection is gone."""
        self.open.clear()

    async def reset(self) -> None:
        await self._ask_all([("reset",) for _ in self.pipes])

    async def collect(self) -> dict[str, Any]:
        replies = await self._ask_all([("stats",) for _ in self.pipes])
        hist: Counter[int] = Counter()
        closed: Counter[str] = Counter()
        for reply in replies:
            hist.update(reply["hist"])
            closed.update(reply["closed"])
        return {
            "received": sum(r["received"] for r in replies),
            "hist": hist,
            "max": max((r["max"] for r in replies), default=0.0),
            "closed": closed,
            "open": sum(r["open"] for r in replies),
        }

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError, EOFError):
                pipe.send(("quit",))
                if pipe.poll(5):
                    pipe.recv()
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()


def percentile(hist: Counter[int], q: float) -> float:
    """The q-quantile of a latency histogram, in milliseconds."""
    total = sum(hist.values())
    if not total:
        return float("nan")
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= q * total:
            return _bucket_ms(bucket)
    return _bucket_ms(max(hist))


def server_percentile(
    before: dict[tuple[str, tuple[Any, ...]], float],
    after: dict[tuple[str, tuple[Any, ...]], float],
    q: float,
) -> float:
    """The q-quantile (a bucket's upper bound, ms) of the server's commit-to-send histogram
    between two scrapes."""
    name = "autodispatch_realtime_commit_to_send_seconds_bucket"
    counts: dict[float, float] = {}
    for (n, labels), value in after.items():
        if n == name:
            le = float(dict(labels)["le"])
            counts[le] = counts.get(le, 0.0) + value - before.get((n, labels), 0.0)
    total = counts.get(float("inf"), 0.0)
    if not total:
        return float("nan")
    for le in sorted(counts):
        if counts[le] >= q * total:
            return le * 1000
    return float("inf")


# --------------------------------------------------------------------------------------
# The server, in its own process
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """``autodispatch serve`` in its own process, with a routing strategy."""

    def __init__(self, home: Path, database_url: str | None) -> None:
        self.home = home
        self.database_url = database_url
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.routing = ""
        self._log: Any = None

    def env(self, routing: str) -> dict[str, str]:
        env = {
            **os.environ,
            "AUTODISPATCH_HOME": str(self.home),
            "AUTODISPATCH_JWT_SECRET": SECRET,
            "AUTODISPATCH_REALTIME_ROUTING": routing,
        }
        env.pop("DATABASE_URL", None)
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        return env

    def start(self, routing: str, profile: Path | None = None) -> None:
        command = [sys.executable, "-m", "autodispatch", "serve", "--port", str(self.port)]
        if profile is not None:
            command[1:1] = ["-m", "pyinstrument", "-r", "text", "--show-all", "-o", str(profile)]
        self.routing = routing
        self._log = (self.home / f"serve-{routing}.log").open("a")
        self.proc = subprocess.Popen(
            command, env=self.env(routing), stdout=self._log, stderr=subprocess.STDOUT
        )
        for _ in range(1200):
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited; see {self.home / f'serve-{routing}.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise SystemExit("serve did not become healthy in 120 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        out = subprocess.run(
            [sys.executable, "-m", "autodispatch", "db-url"],
            env=self.env("keys"),
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    async def metrics(self, client: httpx.AsyncClient) -> dict[tuple[str, tuple[Any, ...]], float]:
        from prometheus_client.parser import text_string_to_metric_families

        for attempt in range(3):
            try:
                r = await client.get(f"{self.base}/metrics")
                break
            except httpx.TransportError:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.2)
        r.raise_for_status()
        found: dict[tuple[str, tuple[Any, ...]], float] = {}
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return found


def _metric(samples: dict[tuple[str, tuple[Any, ...]], float], name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


# pg_stat_statements rows that are not the server's: the writer's statements, the
# event log's commit-time trigger statements of the writer's transactions (deferred
# triggers run at top level, so pg_stat_statements lists them), and this bench's own.
NOT_SERVER_STATEMENTS = (
    WRITER_MARK,
    "update realtime.stream set last_id",
    "update realtime.events set id",
    "pg_notify",
    "pg_stat_statements",
    "pg_backend_pid",
    "last_id from realtime.stream",
)

# Purposes of autodispatch_realtime_db_statements_total that grow with events (the rest
# are per join, per resume, or background): reading the log, the baseline's checks, and
# the listener's statements (its liveness query).
PER_EVENT_PURPOSES = ("read_log", "visibility_check", "listen")


class CpuClock:
    """CPU seconds of some processes (the server; PostgreSQL's; the load generator's)."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids

    def seconds(self) -> dict[int, float]:
        found: dict[int, float] = {}
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                found[pid] = t.user + t.system
        return found

    @staticmethod
    def percent(before: dict[int, float], after: dict[int, float], wall: float) -> float:
        used = sum(after[p] - before[p] for p in after if p in before)
        return 100 * used / wall if wall > 0 else float("nan")


# --------------------------------------------------------------------------------------
# Accounts and the event writer
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    kind: str  # independent, workshop, customer, admin
    user_id: uuid.UUID
    email: str
    mechanic_id: uuid.UUID | None = None
    workshop_id: uuid.UUID | None = None


def _kinds(count: int) -> list[str]:
    """Subscriber kinds in order: admins among the first 100, the rest a smooth mix."""
    kinds: list[str] = []
    given: Counter[str] = Counter()
    admin_slots = {i * 20 for i in range(ADMINS)}
    for i in range(count):
        if i in admin_slots:
            kinds.append("admin")
            continue
        done = len(kinds) - kinds.count("admin")
        kind = max(MIX, key=lambda m: m[1] * (done + 1) - given[m[0]])[0]
        given[kind] += 1
        kinds.append(kind)
    return kinds


async def create_population(url: str, count: int, progress: Progress) -> list[Member]:
    """``count`` accounts of the marketplace mix (cheap password hashes: nobody signs in)."""
    settings = Settings.from_env(
        {}, home=Path(tempfile.gettempdir()), jwt_secret=SECRET, cheap_password_hashing=True
    )
    db = Database(url, min_size=2, max_size=8)
    await db.open()
    kinds = _kinds(count)
    members: list[Member | None] = [None] * count
    gate = asyncio.Semaphore(8)
    try:
        accounts = Accounts(db, settings)

        async def one(i: int) -> None:
            kind = kinds[i]
            email = f"bench-{kind}-{i}@bench.test"
            workshop = f"Bench Workshop {i % WORKSHOPS:02d}" if kind == "workshop" else None
            account_type = {"independent": "mechanic", "workshop": "mechanic"}.get(kind, kind)
            async with gate:
                user = await accounts.create_user(
                    email=email,
                    password="bench-password",
                    account_type=account_type,
                    full_name=f"Bench {kind.title()} {i}",
                    workshop=workshop,
                )
            mechanic = user.get("mechanic") or {}
            members[i] = Member(
                kind, user["id"], email, mechanic.get("id"), mechanic.get("workshop_id")
            )

        # Workshops first, one at a time, so that concurrent accounts do not race to create them.
        firsts: list[int] = []
        seen: set[int] = set()
        for i, kind in enumerate(kinds):
            if kind == "workshop" and i % WORKSHOPS not in seen:
                seen.add(i % WORKSHOPS)
                firsts.append(i)
        for i in firsts:
            await one(i)
        rest = [i for i in range(count) if members[i] is None]
        for start in range(0, len(rest), 500):
            await asyncio.gather(*(one(i) for i in rest[start : start + 500]))
            progress(f"accounts: {min(start + 500, len(rest)) + len(seen)}/{count}")
    finally:
        await db.close()
    return [m for m in members if m is not None]


def join_frames(members: list[Member]) -> list[str]:
    """Each subscriber's ``phx_join``, with its own token and the bindings of its role."""
    tokens = TokenIssuer(SECRET, 12 * 3600)
    frames = []
    for m in members:
        account_type = "mechanic" if m.mechanic_id else m.kind
        token, _ = tokens.access_token(
            user_id=m.user_id, email=m.email, account_type=account_type, name=m.kind
        )
        if m.kind == "admin":
            bindings = [_binding("session_assignments"), _binding("sessions")]
        elif m.kind == "customer":
            mine = f"customer_id=eq.{m.user_id}"
            bindings = [_binding("session_assignments", mine), _binding("sessions", mine)]
        else:
            bindings = [
                _binding("session_assignments"),
                _binding("sessions", f"mechanic_id=eq.{m.mechanic_id}"),
            ]
        config = {
            "broadcast": {"ack": False, "self": False},
            "presence": {"enabled": False, "key": ""},
            "postgres_changes": bindings,
            "private": False,
        }
        frames.append(
            json.dumps(
                {
                    "topic": TOPIC,
                    "event": "phx_join",
                    "payload": {"config": config, "access_token": token},
                    "ref": "1",
                    "join_ref": "1",
                }
            )
        )
    return frames


def _binding(table: str, row_filter: str | None = None) -> dict[str, str]:
    binding = {"event": "*", "schema": "public", "table": table}
    if row_filter:
        binding["filter"] = row_filter
    return binding


# One statement per lifecycle step, as the service; the triggers write the events.
_CREATE = f"""
with {WRITER_MARK} i as (
  insert into public.intakes (customer_id, name, vehicle_year, vehicle_make, vehicle_model, concern)
  values (%(customer)s, 'Bench Driver', 2016, 'Toyota', 'Corolla', 'Grinding noise when braking')
  returning id, customer_id
)
insert into public.sessions (customer_id, intake_id, type, workshop_id)
select customer_id, id, 'free', %(workshop)s from i
returning id"""
_QUEUE = f"""
with {WRITER_MARK} w as (
  insert into public.waivers (session_id, customer_id, signed_name)
  values (%(session)s, %(customer)s, 'Bench Driver')
)
update public.session_assignments set status = 'queued', queued_at = now()
where session_id = %(session)s and status = 'pending_waiver'
returning id"""
_ACCEPT = f"""
update {WRITER_MARK} public.session_assignments
set status = 'accepted', mechanic_id = %(mechanic)s, mechanic_name = 'Bench Mechanic',
    accepted_at = now()
where id = %(assignment)s and status = 'queued'
returning id"""
_START = f"""
update {WRITER_MARK} public.sessions set status = 'live', started_at = now() where id = %(session)s
returning id"""
_END = f"""
update {WRITER_MARK} public.sessions set status = 'completed', ended_at = now()
where id = %(session)s
returning id"""
LIFECYCLE = (
    ("create", _CREATE),
    ("queue", _QUEUE),
    ("accept", _ACCEPT),
    ("start", _START),
    ("end", _END),
)
# Events each step writes (session and assignment rows; see migrations 0001/0002).
EVENTS_PER_STEP = {"create": 2, "queue": 2, "accept": 2, "start": 1, "end": 2}


class Pacer:
    """Hands out events at a rate that can change (0: paused), without bursts."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.rate = 0.0
        self.next = 0.0
        self.generation = 0
        self.changed = asyncio.Event()

    def set_rate(self, rate: float) -> None:
        self.rate = rate
        self.next = self.loop.time()
        self.generation += 1
        self.changed.set()

    async def take(self, events: int) -> None:
        while True:
            if self.rate <= 0:
                self.changed.clear()
                await self.changed.wait()
                continue
            generation = self.generation
            now = self.loop.time()
            at = max(self.next, now - 0.05)
            self.next = at + events / self.rate
            if at > now:
                await asyncio.sleep(at - now)
            if generation == self.generation:
                return
            # The rate changed while we waited (a pause, a new step): take a fresh turn.


class Writer:
    """Requests through their lifecycle, written straight into the database at a rate.

    One task per connection, each taking requests through their whole lifecycle; a task
    keeps its place across pauses, so every measured window sees the steady mix of
    lifecycle steps (not a burst of fresh requests)."""

    def __init__(self, url: str, members: list[Member], connections: int) -> None:
        self.url = url
        self.members = members
        self.connections = connections
        self.rng = random.Random(7)
        self.workshops = sorted({m.workshop_id for m in members if m.workshop_id})
        self.written = 0  # events
        self.errors: list[BaseException] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._conns: list[psycopg.AsyncConnection[Any]] = []
        self._pacer: Pacer | None = None
        self._pools: dict[tuple[tuple[str, ...], uuid.UUID | None], list[Member]] = {}
        self.watching = len(members)

    @property
    def watching(self) -> int:
        return self._watching

    @watching.setter
    def watching(self, count: int) -> None:
        """Subscribers 0..count-1 are connected: requests are theirs when possible."""
        self._watching = count
        self._pools.clear()

    async def start(self) -> None:
        self._pacer = Pacer()
        self._conns = [
            await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            for _ in range(self.connections)
        ]
        self._tasks = [asyncio.create_task(self._lifecycles(conn)) for conn in self._conns]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in self._conns:
            with contextlib.suppress(psycopg.Error):
                await conn.close()
        self._tasks, self._conns = [], []

    def set_rate(self, rate: float) -> None:
        if self.errors:
            raise SystemExit(f"the bench writer failed: {self.errors[0]!r}")
        assert self._pacer is not None
        self._pacer.set_rate(rate)

    async def run(self, rate: float, seconds: float) -> None:
        """Write at ``rate`` events per second for ``seconds``, then pause."""
        self.set_rate(rate)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.set_rate(0)

    def _pick(self, kinds: tuple[str, ...], workshop: uuid.UUID | None = None) -> Member:
        """A member of these kinds, among the connected subscribers when there is one."""
        pool = self._pools.get((kinds, workshop))
        if pool is None:
            for candidates in (self.members[: self.watching], self.members):
                pool = [
                    m
                    for m in candidates
                    if m.kind in kinds and (workshop is None or m.workshop_id == workshop)
                ]
                if pool:
                    break
            if not pool:
                raise SystemExit(f"the bench population has no {kinds} member")
            self._pools[(kinds, workshop)] = pool
        return self.rng.choice(pool)

    async def _lifecycles(self, conn: psycopg.AsyncConnection[Any]) -> None:
        assert self._pacer is not None
        try:
            while True:
                customer = self._pick(("customer",))
                workshop = None
                if self.workshops and self.rng.random() < WORKSHOP_REQUEST_SHARE:
                    workshop = self.rng.choice(self.workshops)
                kinds = ("workshop",) if workshop else ("independent", "workshop")
                ids: dict[str, Any] = {
                    "customer": customer.user_id,
                    "workshop": workshop,
                    "mechanic": self._pick(kinds, workshop).mechanic_id,
                }
                for step, sql in LIFECYCLE:
                    await self._pacer.take(EVENTS_PER_STEP[step])
                    cur = await conn.execute(sql, ids)
                    row = await cur.fetchone()
                    if row is None:
                        raise RuntimeError(f"bench writer: step {step} changed nothing ({ids})")
                    self.written += EVENTS_PER_STEP[step]
                    if step == "create":
                        ids["session"] = row[0]
                    elif step == "queue":
                        ids["assignment"] = row[0]
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # reported by the next set_rate, not lost in a task
            self.errors.append(exc)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


class Bench:
    def __init__(self, options: RealtimeOptions, home: Path, progress: Progress) -> None:
        self.options = options
        self.home = home
        self.progress = progress
        self.server = ServeProcess(home, options.database_url)
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
        self.start_head = 0  # the log's head when the server started

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
        self.start_head = await self._head()
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

    async def _caught_up(self, timeout: float) -> float | None:
        """Wait until the server has routed everything committed so far; return how long
        that took, or None if it did not within ``timeout`` seconds."""
        head = await self._head()
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            samples = await self.server.metrics(self.http)
            position = _metric(samples, "autodispatch_realtime_log_position")
            # The gauge is 0 until the server routes its first event; it started at the head.
            if position >= head or (position == 0 and head == self.start_head):
                waited = time.monotonic() - started
                await asyncio.sleep(0.3)  # frames still in the sockets' queues
                return waited
            await asyncio.sleep(0.05)
        return None

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
        fds = _raise_fd_limit()
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
        self.gen = LoadGenerator(options.processes, "127.0.0.1", self.server.port, anon)

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

    async def _pg_statements(self) -> tuple[int, int]:
        """(statements the server sent, of which background jobs) since the last reset."""
        rows = await self._sql(
            "select query, calls from pg_stat_statements s"
            " join pg_database d on d.oid = s.dbid where d.datname = current_database()"
        )
        server = background = expiry = 0
        for query, calls in rows:
            text = str(query)
            if any(mark in text for mark in NOT_SERVER_STATEMENTS):
                continue
            server += int(calls)
            if "expire_due" in text:
                expiry += int(calls)
            elif text.strip().lower() in ("select $1", "listen autodispatch_events"):
                background += int(calls)
        # Each expiry run is BEGIN, the query, COMMIT.
        return server, background + 3 * expiry

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
        w = Window(strategy, name, len(self.gen.open), rate)
        server_cpu = CpuClock(lambda: [self.server.pid])
        pg_cpu = CpuClock(self._postgres_pids)
        gen_cpu = CpuClock(self._generator_pids)
        writing = asyncio.create_task(self.writer.run(rate, warmup + seconds))
        await asyncio.sleep(warmup)
        await self.gen.reset()
        m0 = await self.server.metrics(self.http)
        c0 = (server_cpu.seconds(), pg_cpu.seconds(), gen_cpu.seconds())
        t0 = time.monotonic()
        await writing
        t_written = time.monotonic()
        w.drain_seconds = await self._caught_up(drain)
        m1 = await self.server.metrics(self.http)
        c1 = (server_cpu.seconds(), pg_cpu.seconds(), gen_cpu.seconds())
        wall = time.monotonic() - t0
        stats = await self.gen.collect()
        w.seconds = t_written - t0
        w.elapsed = wall
        w.events = int(
            _metric(m1, "autodispatch_realtime_events_read_total")
            - _metric(m0, "autodispatch_realtime_events_read_total")
        )
        w.server_delivered = int(
            _metric(m1, "autodispatch_realtime_delivered_total")
            - _metric(m0, "autodispatch_realtime_delivered_total")
        )
        w.received = stats["received"]
        w.p50_ms = percentile(stats["hist"], 0.50)
        w.p99_ms = percentile(stats["hist"], 0.99)
        w.max_ms = stats["max"] * 1000
        w.server_p50_ms = server_percentile(m0, m1, 0.50)
        w.server_p99_ms = server_percentile(m0, m1, 0.99)
        w.server_cpu = CpuClock.percent(c0[0], c1[0], wall)
        w.postgres_cpu = CpuClock.percent(c0[1], c1[1], wall)
        w.generator_cpu = CpuClock.percent(c0[2], c1[2], wall)
        w.disconnects = sum(stats["closed"].values())
        w.kept_up = w.drain_seconds is not None and w.drain_seconds <= self.options.keep_up_seconds
        w.within_limit = w.kept_up and w.p99_ms <= LATENCY_LIMIT * 1000 and not w.disconnects
        self.report.windows.append(w)
        self.progress(
            f"{strategy} {name}: {w.subscribers} subscribers, {w.events_per_s:.0f} events/s,"
            f" {w.deliveries_per_s:.0f} deliveries/s, p50 {w.p50_ms:.1f} ms,"
            f" p99 {w.p99_ms:.1f} ms, max {w.max_ms:.0f} ms, server CPU {w.server_cpu:.0f}%"
            + ("" if w.kept_up else ", fell behind")
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
        if self.report.pg_stat_statements:
            await self._sql("select pg_stat_statements_reset()")
        m0 = await self.server.metrics(self.http)
        await self.writer.run(self.options.statements_rate, self.options.statements_seconds)
        await self._caught_up(5.0)
        m1 = await self.server.metrics(self.http)
        if self.report.pg_stat_statements:
            s.pg_server, s.pg_background = await self._pg_statements()
        s.events = int(
            _metric(m1, "autodispatch_realtime_events_read_total")
            - _metric(m0, "autodispatch_realtime_events_read_total")
        )
        s.realtime_counter = int(
            sum(
                _metric(m1, "autodispatch_realtime_db_statements_total", purpose=p)
                - _metric(m0, "autodispatch_realtime_db_statements_total", purpose=p)
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
        self.progress(f"keys: ramp from {o.ramp_start:g} events/s")
        await self.ramp("keys", o.ramp_start, o.ramp_factor, o.ramp_steps, o.step_seconds)
        await self._subscribe(100)
        await self.statements("keys")

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


# --------------------------------------------------------------------------------------
# Targets (from the issue) and rendering
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    target: str
    figure: str
    met: bool | None  # None: not measured


def verdicts(report: Report) -> list[Verdict]:
    o = report.options
    found: list[Verdict] = []
    lat = report.window("keys", "latency")
    if lat is not None:
        where = f"{lat.subscribers} subscribers, {o.rate:g} events/s"
        found.append(Verdict(f"p50 < 5 ms ({where})", f"{lat.p50_ms:,.1f} ms", lat.p50_ms < 5))
        found.append(Verdict(f"p99 < 50 ms ({where})", f"{lat.p99_ms:,.1f} ms", lat.p99_ms < 50))
    best = report.best("keys", within_limit=True)
    found.append(
        Verdict(
            ">= 40,000 deliveries/s from one gateway, p99 <= 100 ms",
            f"{best.deliveries_per_s:,.0f}/s" if best else "no step within 100 ms",
            best is not None and best.deliveries_per_s >= 40_000,
        )
    )
    mem = report.memory[0] if report.memory else None
    if mem is not None:
        found.append(
            Verdict(
                f"< 20 KB per idle connection ({mem.connections} connections)",
                f"{mem.per_connection / 1000:.1f} KB",
                mem.per_connection < 20_000,
            )
        )
    keys = sorted(
        (s for s in report.statements if s.strategy == "keys"), key=lambda s: s.subscribers
    )
    if len(keys) >= 2:
        # "The same": not more at many subscribers than at few (a busier reader batches more).
        low, high = keys[0], keys[-1]
        same = high.counter_per_event <= low.counter_per_event * 1.25 + 0.05
        figure = f"{low.counter_per_event:.2f} vs {high.counter_per_event:.2f}"
        pg_low, pg_high = low.pg_per_event, high.pg_per_event
        if pg_low is not None and pg_high is not None:
            same = same and pg_high <= pg_low * 1.25 + 0.05
            figure += f" (pg_stat_statements {pg_low:.2f} vs {pg_high:.2f})"
        found.append(
            Verdict(
                f"DB statements/event the same at {low.subscribers} and {high.subscribers}"
                " subscribers",
                figure,
                same,
            )
        )
    if o.baseline:
        # Throughput: the most deliveries/s each strategy kept up with, whatever the latency
        # (the baseline may meet the 100 ms limit at no rate at all).
        ours = report.best("keys", within_limit=False)
        base = report.best("per_subscriber_sql", within_limit=False)
        target = ">= 10x the baseline's deliveries/s (most kept up with)"
        if ours is not None and base is not None and base.deliveries_per_s > 0:
            ratio = ours.deliveries_per_s / base.deliveries_per_s
            figure = f"{ratio:.1f}x ({ours.deliveries_per_s:,.0f} vs {base.deliveries_per_s:,.0f})"
            found.append(Verdict(target, figure, ratio >= 10))
        else:
            figure = "baseline kept up with no step" if ours else "keys kept up with no step"
            found.append(Verdict(target, figure, ours is not None))
    return found


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:,.1f}"  # NaN: nothing received


def _cpu(w: Window) -> str:
    parts = (w.server_cpu, w.postgres_cpu, w.generator_cpu)
    return " / ".join("-" if v != v else f"{v:.0f}" for v in parts)


def _result(w: Window) -> str:
    if w.drain_seconds is None:
        return "fell behind (never caught up)"
    if not w.kept_up:
        return f"fell behind ({w.drain_seconds:.1f} s to catch up)"
    if w.disconnects:
        return f"{w.disconnects} disconnects"
    return "within 100 ms" if w.within_limit else "kept up, p99 > 100 ms"


def _windows_table(title: str, windows: list[Window]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("strategy")
    table.add_column("step")
    for col in ("subscribers", "target ev/s", "events/s", "deliveries/s", "fan-out"):
        table.add_column(col, justify="right")
    for col in ("p50 ms", "p99 ms", "max ms", "server p99 ms", "CPU % serve/PG/load"):
        table.add_column(col, justify="right")
    table.add_column("result")
    for w in windows:
        table.add_row(
            w.strategy,
            w.name.removeprefix("ramp "),
            str(w.subscribers),
            f"{w.target_rate:,.4g}",
            f"{w.events_per_s:,.1f}",
            f"{w.deliveries_per_s:,.0f}",
            f"{w.fan_out:.0f}",
            _ms(w.p50_ms),
            _ms(w.p99_ms),
            _ms(w.max_ms),
            "> 5,000" if w.server_p99_ms == float("inf") else "<= " + _ms(w.server_p99_ms),
            _cpu(w),
            _result(w),
        )
    return table


def render(report: Report, console: Any) -> None:
    """Print the report as Rich tables."""
    from rich.table import Table

    o = report.options
    console.print(
        f"[bold]autodispatch bench realtime[/bold] — {report.date}\n"
        f"Machine: {report.machine}\n"
        f"Server: one `autodispatch serve` process; load: {report.generator_processes}"
        " subscriber processes, and the bench process writing events"
        + (" [yellow](--quick: scaled down)[/yellow]" if o.quick else "")
    )
    latency = [w for w in report.windows if w.name == "latency"]
    console.print(
        _windows_table(
            f"Commit-to-received latency at {o.rate:g} events/s (the baseline: "
            f"{o.baseline_duration:g} s of writes, measured until all were delivered)",
            latency,
        )
    )
    ramp = [w for w in report.windows if w.name.startswith("ramp")]
    console.print(
        _windows_table(
            "Ramp: event rate up until the server falls behind "
            f"(not caught up {o.keep_up_seconds:g} s after the writes stop)",
            ramp,
        )
    )
    for strategy in ("keys", "per_subscriber_sql"):
        inside = report.best(strategy, within_limit=True)
        kept = report.best(strategy, within_limit=False)
        if kept is None and inside is None:
            continue
        console.print(
            f"{strategy}: most deliveries/s within 100 ms p99: "
            + (f"{inside.deliveries_per_s:,.0f}" if inside else "none")
            + "; most kept up with: "
            + (f"{kept.deliveries_per_s:,.0f}" if kept else "none")
        )

    if report.memory:
        mem = Table(title="Server memory (RSS of the serve process), idle joined connections")
        for col in ("connections", "RSS before", "RSS after", "per connection", "open+join time"):
            mem.add_column(col, justify="right")
        for m in report.memory:
            mem.add_row(
                str(m.connections),
                f"{m.rss_before / 2**20:,.0f} MiB",
                f"{m.rss_after / 2**20:,.0f} MiB",
                f"{m.per_connection / 1000:.1f} KB",
                f"{m.open_seconds:.1f} s",
            )
        console.print(mem)

    st = Table(
        title=f"Database statements per event ({o.statements_rate:g} events/s for"
        f" {o.statements_seconds:g} s)"
    )
    for col in (
        "strategy",
        "subscribers",
        "events routed",
        "realtime counter",
        "pg_stat_statements",
    ):
        st.add_column(col, justify="left" if col == "strategy" else "right")
    for s in report.statements:
        pg = s.pg_per_event
        st.add_row(
            s.strategy,
            str(s.subscribers),
            str(s.events),
            f"{s.counter_per_event:.2f}",
            "n/a" if pg is None else f"{pg:.2f}",
        )
    console.print(st)

    targets = Table(title="Targets")
    targets.add_column("target")
    targets.add_column("figure", justify="right")
    targets.add_column("")
    for v in verdicts(report):
        mark = "[green]PASS[/green]" if v.met else "[red]MISS[/red]"
        targets.add_row(v.target, v.figure, "n/a" if v.met is None else mark)
    console.print(targets)
    for note in report.notes:
        console.print(f"Note: {note}")
