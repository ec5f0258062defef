"""Several `serve` processes on one database, and a SIGKILLed one: clients resume anywhere
and lose nothing."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest

from test_serve import Serve, sign_in


@pytest.fixture
def home() -> Iterator[Path]:
    """A home outside pytest's basetemp; every process left on it is killed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="autodispatch-gw-"))
    yield path
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any(str(path) in part for part in cmd):
            proc.kill()
    shutil.rmtree(path, ignore_errors=True)


def db_url(home: Path) -> str:
    env = {**os.environ, "AUTODISPATCH_HOME": str(home)}
    env.pop("DATABASE_URL", None)
    out = subprocess.run(
        [sys.executable, "-m", "autodispatch", "db-url"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


async def read_changes(
    base: str, headers: dict[str, str], tables: str, count: int, cursor: str | None = None
) -> list[dict[str, Any]]:
    """Open an SSE stream (resuming from ``cursor``) and read ``count`` row events."""
    found: list[dict[str, Any]] = []
    hdrs = dict(headers)
    if cursor:
        hdrs["Last-Event-ID"] = cursor
    async with (
        httpx.AsyncClient(timeout=15) as client,
        client.stream("GET", f"{base}/realtime/v1/sse?tables={tables}", headers=hdrs) as r,
    ):
        assert r.status_code == 200
        current: dict[str, str] = {}
        async for line in r.aiter_lines():
            if line == "":
                if current.get("event") == "postgres_changes":
                    found.append({"id": current["id"], "data": json.loads(current["data"])})
                    if len(found) == count:
                        return found
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                current[name] = value
    return found


async def queue_requests(base: str, customer: dict[str, str], n: int) -> list[str]:
    ids = []
    async with httpx.AsyncClient(base_url=base, timeout=15) as client:
        for _ in range(n):
            r = await client.post(
                "/api/sessions",
                headers=customer,
                json={
                    "type": "free",
                    "intake": {
                        "name": "Gale",
                        "vehicle_year": 2011,
                        "vehicle_make": "Kia",
                        "vehicle_model": "Rio",
                        "concern": "Rattle",
                    },
                },
            )
            sid = r.json()["session"]["id"]
            r = await client.post(f"/api/sessions/{sid}/waiver", headers=customer)
            ids.append(r.json()["assignment"]["id"])
    return ids


def test_two_gateways_deliver_the_same_log_and_resume_across(home: Path) -> None:
    """Changes made through one process reach clients of the other; a client that moves from
    one process to the other resumes without loss or duplicates."""
    a = Serve(home)
    a.wait_ready()
    b = Serve(home, demo=False)
    b.wait_ready()
    try:

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=a.base) as client:
                mechanic = await sign_in(client, "mechanic@demo.test")
                customer = await sign_in(client, "customer@demo.test")
            reader = asyncio.create_task(read_changes(a.base, mechanic, "session_assignments", 3))
            await asyncio.sleep(0.5)
            made = await queue_requests(b.base, customer, 3)
            seen = await asyncio.wait_for(reader, 20)
            assert [e["data"]["record"]["id"] for e in seen] == made
            cursor = seen[-1]["id"]
            later = await queue_requests(a.base, customer, 10)
            resumed = await read_changes(b.base, mechanic, "session_assignments", 10, cursor)
            assert [e["data"]["record"]["id"] for e in resumed] == later
            ids = [int(e["id"]) for e in resumed]
            assert ids == sorted(set(ids)) and ids[0] > int(cursor)

        asyncio.run(scenario())
    finally:
        b.stop()
        a.stop()


def test_sigkill_mid_stream_loses_nothing_for_resumed_clients(home: Path) -> None:
    """While writes keep committing, serve is SIGKILLed and restarted; a client resuming from
    its last event id gets every later change, in order, once."""
    first = Serve(home)
    first.wait_ready()
    url = db_url(home)

    async def before() -> str:
        got = asyncio.create_task(read_changes(first.base, {}, "feature_flags", 1))
        await asyncio.sleep(0.5)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(
                "update feature_flags set description = 'x0' where key = 'mech_audio_alerts'"
            )
        seen = await asyncio.wait_for(got, 20)
        return str(seen[0]["id"])

    cursor = asyncio.run(before())
    writes = 20

    async def write_through_the_crash() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            for i in range(1, writes + 1):
                await conn.execute(
                    "update feature_flags set description = %s where key = 'mech_audio_alerts'",
                    (f"x{i}",),
                )
                if i == writes // 2:
                    first.stop(signal.SIGKILL)
                await asyncio.sleep(0.02)

    asyncio.run(write_through_the_crash())
    second = Serve(home, demo=False)
    second.wait_ready()
    try:
        resumed = asyncio.run(read_changes(second.base, {}, "feature_flags", writes, cursor))
        assert [e["data"]["record"]["description"] for e in resumed] == [
            f"x{i}" for i in range(1, writes + 1)
        ]
        ids = [int(e["id"]) for e in resumed]
        assert ids == list(range(int(cursor) + 1, int(cursor) + 1 + writes))
    finally:
        second.stop()


def test_shutdown_tells_each_channel_then_closes_with_1012(home: Path) -> None:
    """SIGTERM: every joined channel gets a `system` ServerShutdown message, then the socket
    closes with code 1012 (service restart), so clients reconnect and resume."""
    import websockets

    from autodispatch.realtime import protocol as p

    s = Serve(home)
    s.wait_ready()

    async def scenario() -> tuple[list[p.Message], int | None]:
        async with httpx.AsyncClient() as http:
            anon = (await http.get(f"{s.base}/api/config")).json()["anon_key"]
        url = f"ws://127.0.0.1:{s.port}/realtime/v1/websocket?apikey={anon}&vsn=1.0.0"
        got: list[p.Message] = []
        async with websockets.connect(url) as ws:
            join = {"config": {"postgres_changes": [{"event": "*", "table": "feature_flags"}]}}
            await ws.send(
                p.encode(p.Message("1", "1", "realtime:flags", "phx_join", join), p.VSN_1)
            )
            got.append(p.decode(await ws.recv(), p.VSN_1))
            s.proc.send_signal(signal.SIGTERM)
            try:
                while True:
                    got.append(p.decode(await asyncio.wait_for(ws.recv(), 10), p.VSN_1))
            except websockets.ConnectionClosed as closed:
                return got, closed.rcvd.code if closed.rcvd else None

    messages, code = asyncio.run(scenario())
    s.stop()  # already exiting: waits, and closes the log
    assert messages[0].payload["status"] == "ok"
    system = [m for m in messages if m.event == "system" and m.payload["status"] == "error"]
    assert system and "ServerShutdown" in system[0].payload["message"]
    assert code == 1012
