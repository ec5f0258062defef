"""`autodispatch serve` as a real process on real sockets: the demo script, signals, restarts."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from autodispatch.db.embedded import running_url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """One `autodispatch serve` process."""

    def __init__(self, home: Path, *, demo: bool = True, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "autodispatch", "serve", "--port", str(self.port)]
        if demo:
            args.append("--demo")
        self.log = home / f"serve-{self.port}.log"
        home.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "AUTODISPATCH_HOME": str(home), **(env or {})}
        full_env.pop("DATABASE_URL", None)
        full_env.update(env or {})
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            args, env=full_env, stdout=self._log_file, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited early:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"serve did not become healthy:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self._log_file.close()

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder outside pytest's basetemp (which pytest resets to 0700, shutting out the
    server's own system user when tests run as root)."""
    path = Path(tempfile.mkdtemp(prefix="autodispatch-serve-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serves(scratch: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
        s.stop()
    # Leave no embedded PostgreSQL behind, whatever the test did.
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any(str(scratch) in part for part in cmd) and "postgres" in " ".join(cmd):
            proc.kill()


def postmasters(home: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if len(cmd) >= 3 and cmd[0].endswith("/postgres") and str(home) in " ".join(cmd):
            found.append(proc)
    return found


async def sign_in(client: httpx.AsyncClient, email: str) -> dict[str, str]:
    r = await client.post(
        "/auth/v1/token?grant_type=password", json={"email": email, "password": "demo-password"}
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


async def demo_script(base: str) -> dict[str, Any]:
    """DESIGN's scripted run: request, waiver, a simultaneous accept, start, end, cancel."""
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        customer = await sign_in(client, "customer@demo.test")
        mechanic = await sign_in(client, "mechanic@demo.test")
        workshop = await sign_in(client, "workshop.mechanic@demo.test")

        async def queue(headers: dict[str, str]) -> list[str]:
            r = await client.get("/api/mechanic/queue", headers=headers)
            assert r.headers["cache-control"] == "no-store"
            return [i["id"] for i in r.json()["items"]]

        r = await client.post(
            "/api/sessions",
            headers=customer,
            json={
                "type": "free",
                "intake": {
                    "name": "Casey Customer",
                    "vehicle_year": 2018,
                    "vehicle_make": "Mazda",
                    "vehicle_model": "3",
                    "concern": "Check engine light is on",
                },
            },
        )
        assert r.status_code == 201, r.text
        sid, aid = r.json()["session"]["id"], r.json()["assignment"]["id"]
        assert r.json()["assignment"]["status"] == "pending_waiver"
        assert aid not in await queue(mechanic) and aid not in await queue(workshop)

        r = await client.post(f"/api/sessions/{sid}/waiver", headers=customer)
        assert r.json()["assignment"]["status"] == "queued"
        assert aid in await queue(mechanic) and aid in await queue(workshop)

        first, second = await asyncio.gather(
            client.post(f"/api/assignments/{aid}/accept", headers=mechanic),
            client.post(f"/api/assignments/{aid}/accept", headers=workshop),
        )
        assert sorted([first.status_code, second.status_code]) == [200, 409]
        winner, loser = (mechanic, workshop) if first.status_code == 200 else (workshop, mechanic)
        assert aid not in await queue(loser)

        r = await client.post(f"/api/sessions/{sid}/start", headers=winner)
        assert r.json()["session"]["status"] == "live"
        r = await client.post(f"/api/sessions/{sid}/end", headers=customer)
        assert (r.json()["session"]["status"], r.json()["assignment"]["status"]) == (
            "completed",
            "completed",
        )
        assert aid not in await queue(mechanic) and aid not in await queue(workshop)

        r = await client.post(
            "/api/sessions",
            headers=customer,
            json={
                "type": "free",
                "intake": {
                    "name": "Casey",
                    "vehicle_year": 2010,
                    "vehicle_make": "VW",
                    "vehicle_model": "Golf",
                    "concern": "Battery",
                },
            },
        )
        sid2, aid2 = r.json()["session"]["id"], r.json()["assignment"]["id"]
        await client.post(f"/api/sessions/{sid2}/waiver", headers=customer)
        assert aid2 in await queue(mechanic)
        r = await client.post(f"/api/sessions/{sid2}/cancel", headers=customer)
        assert r.json()["assignment"]["status"] == "cancelled"
        assert aid2 not in await queue(mechanic) and aid2 not in await queue(workshop)
        return {"session": sid, "cancelled": sid2}


def test_demo_script_then_clean_shutdown(scratch: Path, serves: list[Serve]) -> None:
    """serve --demo prints the accounts, passes the scripted run, stops PostgreSQL on SIGTERM."""
    s = Serve(scratch / "home")
    serves.append(s)
    s.wait_ready()
    for email in ("customer@demo.test", "mechanic@demo.test", "workshop.mechanic@demo.test"):
        assert email in s.output()
    asyncio.run(demo_script(s.base))
    assert running_url(scratch / "home" / "postgres") is not None
    s.stop(signal.SIGTERM)
    assert postmasters(scratch / "home") == []
    assert running_url(scratch / "home" / "postgres") is None


def test_restart_after_sigkill_keeps_data(scratch: Path, serves: list[Serve]) -> None:
    """After serve is SIGKILLed, the next serve on that home starts cleanly with the data intact."""
    home = scratch / "home"
    first = Serve(home)
    serves.append(first)
    first.wait_ready()
    ids = asyncio.run(demo_script(first.base))
    first.stop(signal.SIGKILL)
    second = Serve(home)
    serves.append(second)
    second.wait_ready()

    async def check() -> None:
        async with httpx.AsyncClient(base_url=second.base) as client:
            customer = await sign_in(client, "customer@demo.test")
            r = await client.get(f"/api/sessions/{ids['session']}", headers=customer)
            assert r.json()["session"]["status"] == "completed"

    asyncio.run(check())
    assert "(exists)" in second.output()
    second.stop()
    assert postmasters(home) == []


def test_two_serves_share_one_home(scratch: Path, serves: list[Serve]) -> None:
    """A second serve on the same home joins the running database; it outlives the first."""
    home = scratch / "home"
    first = Serve(home)
    serves.append(first)
    first.wait_ready()
    second = Serve(home)
    serves.append(second)
    second.wait_ready()
    assert len(postmasters(home)) == 1
    first.stop()
    assert len(postmasters(home)) == 1
    asyncio.run(demo_script(second.base))
    second.stop()
    assert postmasters(home) == []


def test_db_url_points_at_the_running_database(scratch: Path, serves: list[Serve]) -> None:
    """`autodispatch db-url` prints a URL psql-compatible clients can use; it fails when stopped."""
    import psycopg

    home = scratch / "home"
    env = {**os.environ, "AUTODISPATCH_HOME": str(home)}
    env.pop("DATABASE_URL", None)
    stopped = subprocess.run(
        [sys.executable, "-m", "autodispatch", "db-url"], env=env, capture_output=True, text=True
    )
    assert stopped.returncode == 1 and "not running" in stopped.stderr
    s = Serve(home)
    serves.append(s)
    s.wait_ready()
    out = subprocess.run(
        [sys.executable, "-m", "autodispatch", "db-url"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    url = out.stdout.strip()
    assert url.startswith("postgresql://")
    with psycopg.connect(url) as conn:
        row = conn.execute("select count(*) from auth.users").fetchone()
        assert row is not None and row[0] == 4
    s.stop()


PROBE = (sys.executable, "-m", "autodispatch", "probe")


def test_probe_passes_for_every_demo_account(scratch: Path, serves: list[Serve]) -> None:
    """`autodispatch probe` as each demo account against `serve --demo`: exit 0, all steps ok."""
    import json

    s = Serve(scratch / "home")
    serves.append(s)
    s.wait_ready()
    env = {**os.environ, "AUTODISPATCH_HOME": str(scratch / "home")}
    for email in (
        "customer@demo.test",
        "mechanic@demo.test",
        "workshop.mechanic@demo.test",
        "admin@demo.test",
    ):
        done = subprocess.run(
            [*PROBE, "--email", email, "--password", "demo-password", "--url", s.base, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["ok"] and report["email"] == email
        assert [step["name"] for step in report["steps"]][-1] == "delivery"
    wrong = subprocess.run(
        [*PROBE, "--email", "customer@demo.test", "--password", "wrong-password", "--url", s.base],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrong.returncode == 1
    assert "The probe failed at sign-in" in wrong.stdout
