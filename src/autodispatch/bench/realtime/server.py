"""The server under test, in its own process, and what it reports: metrics, CPU."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from autodispatch.bench.realtime.workload import SECRET, WRITER_MARK


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """``autodispatch serve`` in its own process, with a routing strategy."""

    def __init__(self, home: Path, database_url: str | None, name: str = "serve") -> None:
        self.home = home
        self.database_url = database_url
        self.name = name  # of its log file
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.routing = ""
        self.start_head = 0  # the log's head when it started
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
        log = self.home / f"{self.name}-{routing}.log"
        self._log = log.open("a")
        self.proc = subprocess.Popen(
            command, env=self.env(routing), stdout=self._log, stderr=subprocess.STDOUT
        )
        for _ in range(1200):
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited; see {log}")
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


def metric(samples: dict[tuple[str, tuple[Any, ...]], float], name: str, **labels: str) -> float:
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

# The realtime reader's queries of the log (live reads and resumes; the web-push sender's
# read of the log selects no old_record).
LOG_READ = ("realtime.events", "old_record")

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


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used (all cores), to tell how much
    of the machine was not ours during a measurement."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def server_percentile(
    before: list[dict[tuple[str, tuple[Any, ...]], float]],
    after: list[dict[tuple[str, tuple[Any, ...]], float]],
    q: float,
    histogram: str = "autodispatch_realtime_commit_to_send_seconds",
) -> float:
    """The q-quantile (a bucket's upper bound, ms) of the gateways' histogram (by
    default commit-to-send) between two scrapes of each."""
    name = f"{histogram}_bucket"
    counts: dict[float, float] = {}
    for first, last in zip(before, after, strict=True):
        for (n, labels), value in last.items():
            if n == name:
                le = float(dict(labels)["le"])
                counts[le] = counts.get(le, 0.0) + value - first.get((n, labels), 0.0)
    total = counts.get(float("inf"), 0.0)
    if not total:
        return float("nan")
    for le in sorted(counts):
        if counts[le] >= q * total:
            return le * 1000
    return float("inf")
