"""Benchmarks: commands that print figures (never timed tests).

``contention``: N mechanics race over HTTP for M queued requests against a real
``autodispatch serve`` process (its own process, its own embedded PostgreSQL unless a
database URL is given). Two phases in one run: a baseline where each mechanic takes its
own share of the requests (no contention), then the race, where every mechanic tries to
accept every request in order, so each request sees all N mechanics at once. It checks
the outcome as it goes: exactly one 200 per request, every other attempt a 409.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from autodispatch.bench.machine import machine
from autodispatch.config import Settings
from autodispatch.db.database import Database
from autodispatch.identity.accounts import Accounts


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    winners: dict[str, str] = field(default_factory=dict)
    conflicts: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def row(self) -> dict[str, Any]:
        return {
            "phase": self.name,
            "accepts": len(self.winners),
            "conflicts_409": self.conflicts,
            "errors": len(self.errors),
            "seconds": round(self.elapsed, 2),
            "accepts_per_s": round(len(self.winners) / self.elapsed, 1) if self.elapsed else 0,
            "attempts_per_s": round(len(self.latencies) / self.elapsed, 1) if self.elapsed else 0,
            "p50_ms": round(self.percentile(0.50), 1),
            "p99_ms": round(self.percentile(0.99), 1),
            "max_ms": round(max(self.latencies, default=0) * 1000, 1),
            "mean_ms": round(statistics.fmean(self.latencies) * 1000, 1) if self.latencies else 0,
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`autodispatch serve` in its own process."""

    def __init__(self, home: Path, database_url: str | None) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "AUTODISPATCH_HOME": str(home), "AUTODISPATCH_JWT_SECRET": "b" * 48}
        env.pop("DATABASE_URL", None)
        if database_url:
            env["DATABASE_URL"] = database_url
        self.log = (home / "serve.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "autodispatch", "serve", "--port", str(self.port)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.home = home

    def wait(self) -> None:
        for _ in range(600):
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited; see {self.home / 'serve.log'}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit("serve did not become healthy in 60 s")

    def database_url(self) -> str:
        env = {**os.environ, "AUTODISPATCH_HOME": str(self.home)}
        out = subprocess.run(
            [sys.executable, "-m", "autodispatch", "db-url"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


async def _accounts(url: str, mechanics: int, customers: int) -> None:
    settings = Settings.from_env({}, home=Path(tempfile.gettempdir()), jwt_secret="b" * 48)
    db = Database(url, min_size=1, max_size=4)
    await db.open()
    try:
        accounts = Accounts(db, settings)
        for i in range(mechanics):
            await accounts.create_user(
                email=f"bench-mechanic-{i}@bench.test",
                password="bench-password",
                account_type="mechanic",
                full_name=f"Bench Mechanic {i}",
            )
        for i in range(customers):
            await accounts.create_user(
                email=f"bench-customer-{i}@bench.test",
                password="bench-password",
                account_type="customer",
                full_name=f"Bench Customer {i}",
            )
    finally:
        await db.close()


async def _token(client: httpx.AsyncClient, email: str) -> dict[str, str]:
    r = await client.post(
        "/auth/v1/token?grant_type=password", json={"email": email, "password": "bench-password"}
    )
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


async def _queue_requests(
    client: httpx.AsyncClient, customers: list[dict[str, str]], count: int
) -> list[str]:
    body = {
        "type": "free",
        "intake": {
            "name": "Bench Driver",
            "vehicle_year": 2015,
            "vehicle_make": "Honda",
            "vehicle_model": "Civic",
            "concern": "Benchmark request",
        },
    }
    ids: list[str] = [""] * count
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with sem:
            headers = customers[i % len(customers)]
            r = await client.post("/api/sessions", json=body, headers=headers)
            r.raise_for_status()
            sid = r.json()["session"]["id"]
            r = await client.post(f"/api/sessions/{sid}/waiver", headers=headers)
            r.raise_for_status()
            ids[i] = r.json()["assignment"]["id"]

    await asyncio.gather(*(one(i) for i in range(count)))
    return ids


async def _attempt(
    client: httpx.AsyncClient, phase: Phase, aid: str, headers: dict[str, str], who: str
) -> None:
    started = time.perf_counter()
    r = await client.post(f"/api/assignments/{aid}/accept", headers=headers)
    phase.latencies.append(time.perf_counter() - started)
    if r.status_code == 200:
        if aid in phase.winners:
            phase.errors.append(f"{aid}: second winner {who} after {phase.winners[aid]}")
        phase.winners[aid] = who
    elif r.status_code == 409:
        phase.conflicts += 1
    else:
        phase.errors.append(f"{aid}: {r.status_code} {r.text[:200]}")


async def _phase_uncontended(
    client: httpx.AsyncClient, mechanics: list[dict[str, str]], ids: list[str]
) -> Phase:
    phase = Phase("baseline: each mechanic takes its own requests")
    n = len(mechanics)

    async def worker(w: int) -> None:
        for aid in ids[w::n]:
            await _attempt(client, phase, aid, mechanics[w], str(w))

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(n)))
    phase.elapsed = time.perf_counter() - started
    return phase


async def _phase_race(
    client: httpx.AsyncClient, mechanics: list[dict[str, str]], ids: list[str]
) -> Phase:
    phase = Phase("race: every mechanic tries every request")

    async def worker(w: int) -> None:
        for aid in ids:
            if aid in phase.winners:
                continue  # this mechanic's alert would already be gone
            await _attempt(client, phase, aid, mechanics[w], str(w))

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(len(mechanics))))
    phase.elapsed = time.perf_counter() - started
    return phase


async def run_contention(
    base: str, db_url: str, mechanics: int, requests: int, progress: Any
) -> list[Phase]:
    customers = 10
    progress("creating accounts")
    await _accounts(db_url, mechanics * 2, customers)
    limits = httpx.Limits(max_connections=mechanics + 16, max_keepalive_connections=mechanics + 16)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        progress("signing in")
        mech_headers = [
            await _token(client, f"bench-mechanic-{i}@bench.test") for i in range(mechanics * 2)
        ]
        cust_headers = [
            await _token(client, f"bench-customer-{i}@bench.test") for i in range(customers)
        ]
        progress(f"queueing {requests} requests for the baseline")
        ids = await _queue_requests(client, cust_headers, requests)
        progress("baseline phase")
        baseline = await _phase_uncontended(client, mech_headers[:mechanics], ids)
        progress(f"queueing {requests} requests for the race")
        ids = await _queue_requests(client, cust_headers, requests)
        progress("race phase")
        race = await _phase_race(client, mech_headers[mechanics:], ids)
    return [baseline, race]


def contention(
    mechanics: int, requests: int, database_url: str | None, progress: Any
) -> tuple[list[Phase], str]:
    with tempfile.TemporaryDirectory(prefix="autodispatch-bench-") as tmp:
        home = Path(tmp)
        progress("starting serve")
        server = Server(home, database_url)
        try:
            server.wait()
            url = database_url or server.database_url()
            phases = asyncio.run(run_contention(server.base, url, mechanics, requests, progress))
        finally:
            server.stop()
    return phases, machine()
