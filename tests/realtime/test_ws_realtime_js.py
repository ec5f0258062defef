"""The stock ``@supabase/realtime-js`` client, under node, against our live WebSocket server.

Each test starts real node processes (``js/rt_client.js``) that connect with the anon key
as ``apikey``, ``setAuth`` a user token and subscribe; they print what they receive as
JSON lines and take commands on stdin. Node 20 has no global WebSocket, so the ``ws``
package is installed next to realtime-js and passed as ``transport``.

Absence is checked with a fence, not a sleep: every client also listens to
``feature_flags`` updates (visible to everyone), the test updates a flag and waits until
each client has that event. Events reach a connection in log order, so whatever a client
has not received by then, it was never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import npm_cache
import psycopg
import pytest
from live_servers import serve_live

from conftest import Account, LiveWorld

REALTIME_JS_VERSION = "2.109.0"
WS_VERSION = "8.18.3"
NPM_CACHE = Path(os.environ.get("AUTODISPATCH_NPM_CACHE", "/tmp/autodispatch-npm-cache"))
CLIENT_SCRIPT = Path(__file__).parent / "js" / "rt_client.js"
WAIT = 15.0  # seconds to wait for something that should come within milliseconds
FENCE_FLAG = "mech_audio_alerts"
ASSIGNMENTS = {"event": "*", "schema": "public", "table": "session_assignments"}
FLAGS = {"event": "UPDATE", "schema": "public", "table": "feature_flags"}


def install_realtime_js_with_ws() -> Path:
    """realtime-js and ws, installed once per machine (see npm_cache)."""
    return npm_cache.install(
        f"realtime-js-{REALTIME_JS_VERSION}-ws-{WS_VERSION}",
        [f"@supabase/realtime-js@{REALTIME_JS_VERSION}", f"ws@{WS_VERSION}"],
    )


@pytest.fixture(scope="session")
def rtjs() -> Path:
    if shutil.which("node") is None:
        pytest.skip("node is not installed; the realtime-js WebSocket tests need it")
    return install_realtime_js_with_ws()


class JsClient:
    """One node process running realtime-js; ``lines`` is everything it printed."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.lines: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.stderr = b""
        self._ids = itertools.count(1)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        stderr = asyncio.create_task(self.proc.stderr.read())  # drained alongside stdout
        while line := await self.proc.stdout.readline():
            self.lines.append(json.loads(line))
            self.changed.set()
        self.stderr = await stderr
        self.changed.set()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["type"] == kind]

    def changes(self, table: str = "session_assignments") -> list[dict[str, Any]]:
        """The row events received for ``table``, as realtime-js handed them to the callback."""
        return [
            line["payload"]
            for line in self.of("postgres_changes")
            if line["payload"]["table"] == table
        ]

    async def wait_for(self, what: str, condition: Callable[[], Any], timeout: float = WAIT) -> Any:
        """Wait until ``condition()`` is truthy and return it; fail saying ``what`` was missing."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            self.changed.clear()
            value = condition()
            if value:
                return value
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0 or (self._reader.done() and not self.changed.is_set()):
                raise AssertionError(
                    f"{self.name}: no {what} (waited up to {timeout}s); got {self.lines}"
                    f"\nstderr: {self.stderr.decode(errors='replace')}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    async def wait_changes(self, count: int, table: str = "session_assignments") -> list[Any]:
        return list(
            await self.wait_for(
                f"{count} {table} events",
                lambda: len(self.changes(table)) >= count and self.changes(table),
            )
        )

    async def subscribed(self) -> None:
        statuses = await self.wait_for("subscribe status", lambda: self.of("status"))
        assert statuses[0]["status"] == "SUBSCRIBED", statuses

    async def command(self, cmd: str, **args: Any) -> Any:
        """Run one command in the client and return its result."""
        assert self.proc.stdin is not None
        command_id = next(self._ids)
        self.proc.stdin.write(json.dumps({"cmd": cmd, "id": command_id, **args}).encode() + b"\n")
        await self.proc.stdin.drain()
        (line,) = await self.wait_for(
            f"result of {cmd}",
            lambda: [r for r in self.of("result") if r["id"] == command_id],
        )
        return line["result"]

    async def close(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(ConnectionError):
                self.proc.stdin.write(b'{"cmd": "exit"}\n')
                await self.proc.stdin.drain()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self._reader


async def anon_key(live: LiveWorld) -> str:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{live.server.base}/api/config")
    assert r.status_code == 200, r.text
    key: str = r.json()["anon_key"]
    return key


@asynccontextmanager
async def js_client(
    live: LiveWorld,
    rtjs: Path,
    who: Account | None,
    *,
    changes: list[dict[str, Any]] | None = None,
    config: dict[str, Any] | None = None,
    vsn: str | None = None,
    channel: str = "dispatch",
) -> AsyncIterator[JsClient]:
    """A subscribed realtime-js client; ``changes`` defaults to assignments plus the fence."""
    cfg: dict[str, Any] = {
        "url": f"{live.server.ws_base}/realtime/v1",
        "apikey": await anon_key(live),
        "token": who.token if who else None,
        "channel": channel,
        "config": config or {},
        "changes": [ASSIGNMENTS, FLAGS] if changes is None else changes,
        "timeout_ms": 60_000,
    }
    if vsn is not None:
        cfg["vsn"] = vsn
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(CLIENT_SCRIPT),
        json.dumps(cfg),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "RTJS_DIR": str(rtjs)},
        limit=2**22,
    )
    client = JsClient(proc, who.email if who else channel)
    try:
        await client.subscribed()
        yield client
    finally:
        await client.close()


class Fence:
    """Updates a feature flag; ``wait`` returns once every client has received that update."""

    def __init__(self, live: LiveWorld) -> None:
        self.db_url = live.db_url
        self.count = 0

    async def wait(self, *clients: JsClient) -> None:
        self.count += 1
        text = f"fence {self.count}"
        async with await psycopg.AsyncConnection.connect(self.db_url, autocommit=True) as conn:
            await conn.execute(
                "update public.feature_flags set description = %s where key = %s",
                (text, FENCE_FLAG),
            )
        for client in clients:
            await client.wait_for(
                text,
                lambda c=client: any(  # type: ignore[misc]
                    e["new"].get("description") == text for e in c.changes("feature_flags")
                ),
            )


def row_ids(events: list[dict[str, Any]]) -> list[Any]:
    return [(e["new"] or e["old"]).get("id") for e in events]


# --- postgres_changes ------------------------------------------------------------------


async def demo_accounts(live: LiveWorld) -> dict[str, Account]:
    """The `serve --demo` accounts, signed in through /auth/v1/token like a browser would."""
    from autodispatch.db.database import Database
    from autodispatch.identity.accounts import Accounts
    from autodispatch.ops.demo import DEMO_ACCOUNTS, DEMO_PASSWORD, ensure_demo_accounts

    db = Database(live.db_url, min_size=1, max_size=2)
    await db.open()
    try:
        await ensure_demo_accounts(db, Accounts(db, live.server.settings.with_secret()))
    finally:
        await db.close()
    accounts: dict[str, Account] = {}
    async with httpx.AsyncClient(timeout=10) as http:
        for demo in DEMO_ACCOUNTS:
            r = await http.post(
                f"{live.server.base}/auth/v1/token?grant_type=password",
                json={"email": demo.email, "password": DEMO_PASSWORD},
            )
            assert r.status_code == 200, r.text
            body = r.json()
            accounts[demo.email] = Account(
                id=body["user"]["id"],
                email=demo.email,
                token=body["access_token"],
                account_type=demo.account_type,
            )
    return accounts


@pytest.fixture
async def live(db_url: str, tmp_path: Path) -> AsyncIterator[LiveWorld]:
    """The server as ``autodispatch serve`` runs it (the realtime WebSocket served natively)."""
    async with serve_live(db_url, tmp_path) as world:
        yield world


@pytest.mark.parametrize("vsn", [None, "1.0.0"], ids=["default-vsn", "vsn-1.0.0"])
async def test_demo_mechanic_gets_the_queued_request_right_after_the_waiver(
    live: LiveWorld, rtjs: Path, vsn: str | None
) -> None:
    """The demo mechanic's realtime-js subscription receives the request, as an UPDATE to
    queued carrying its request_summary, once the demo customer signs the waiver (and
    nothing before: a request awaiting its waiver is not theirs to see)."""
    demo = await demo_accounts(live)
    mechanic, customer = demo["mechanic@demo.test"], demo["customer@demo.test"]
    async with (
        js_client(live, rtjs, mechanic, vsn=vsn) as js,
        httpx.AsyncClient(timeout=10) as http,
    ):
        hello = js.of("hello")
        expected_vsn = vsn or "2.0.0"  # realtime-js's default
        assert hello and f"vsn={expected_vsn}" in hello[0]["url"], hello
        assert hello[0]["version"] == REALTIME_JS_VERSION
        pair = await live.queued(http, customer)
        aid = pair["assignment"]["id"]
        (event,) = await js.wait_changes(1)
        assert event["eventType"] == "UPDATE"
        assert event["table"] == "session_assignments" and event["schema"] == "public"
        assert event["new"]["id"] == aid
        assert event["new"]["status"] == "queued"
        assert event["old"] == {}  # the row before the waiver was not theirs to see
        summary = event["new"]["request_summary"]
        assert summary["vehicle"] == "2016 Toyota Corolla", summary
        assert summary["concern"] == "Grinding noise when braking", summary


@pytest.mark.parametrize("vsn", [None, "1.0.0"], ids=["default-vsn", "vsn-1.0.0"])
async def test_customers_see_only_their_own_rows(
    live: LiveWorld, rtjs: Path, vsn: str | None
) -> None:
    """A customer's subscription gets the INSERT and the UPDATE of their own request and
    nothing of another customer's; the other customer sees none of theirs."""
    cara = await live.make("cara", "customer")
    olly = await live.make("olly", "customer")
    fence = Fence(live)
    async with (
        js_client(live, rtjs, cara, vsn=vsn) as cara_js,
        js_client(live, rtjs, olly, vsn=vsn) as olly_js,
        httpx.AsyncClient(timeout=10) as http,
    ):
        mine = (await live.queued(http, cara))["assignment"]["id"]
        theirs = (await live.queued(http, olly))["assignment"]["id"]
        await fence.wait(cara_js, olly_js)
        cara_events = cara_js.changes()
        assert [(e["eventType"], e["new"]["status"]) for e in cara_events] == [
            ("INSERT", "pending_waiver"),
            ("UPDATE", "queued"),
        ]
        assert row_ids(cara_events) == [mine, mine]
        olly_events = olly_js.changes()
        assert row_ids(olly_events) == [theirs, theirs]


async def test_workshop_mechanics_never_see_another_workshops_requests(
    live: LiveWorld, rtjs: Path
) -> None:
    """A request for one workshop reaches that workshop's mechanic only; the rival
    workshop's mechanic gets only the request addressed to their own workshop."""
    customer = await live.make("cara", "customer")
    wes = await live.make("wes", "mechanic", workshop="North Garage")
    rita = await live.make("rita", "mechanic", workshop="South Garage")
    fence = Fence(live)
    async with (
        js_client(live, rtjs, wes) as wes_js,
        js_client(live, rtjs, rita) as rita_js,
        httpx.AsyncClient(timeout=10) as http,
    ):
        north = (await live.queued(http, customer, wes.workshop_id))["assignment"]["id"]
        south = (await live.queued(http, customer, rita.workshop_id))["assignment"]["id"]
        await fence.wait(wes_js, rita_js)
        assert row_ids(wes_js.changes()) == [north]
        assert row_ids(rita_js.changes()) == [south]
        assert wes_js.changes()[0]["new"]["status"] == "queued"


@pytest.mark.parametrize("vsn", [None, "1.0.0"], ids=["default-vsn", "vsn-1.0.0"])
async def test_other_mechanics_get_a_delete_when_one_accepts(
    live: LiveWorld, rtjs: Path, vsn: str | None
) -> None:
    """After one mechanic accepts, the winner gets the UPDATE to accepted and every other
    mechanic a realtime-js DELETE whose ``old.id`` is the request, so their lists shrink."""
    customer = await live.make("cara", "customer")
    mo = await live.make("mo", "mechanic")
    max_ = await live.make("max", "mechanic")
    wes = await live.make("wes", "mechanic", workshop="North Garage")
    async with (
        js_client(live, rtjs, mo, vsn=vsn) as mo_js,
        js_client(live, rtjs, max_, vsn=vsn) as max_js,
        js_client(live, rtjs, wes, vsn=vsn) as wes_js,
        httpx.AsyncClient(timeout=10) as http,
    ):
        aid = (await live.queued(http, customer))["assignment"]["id"]
        for js in (mo_js, max_js, wes_js):
            (queued,) = await js.wait_changes(1)
            assert queued["new"]["id"] == aid and queued["new"]["status"] == "queued"
        r = await http.post(f"{live.server.base}/api/assignments/{aid}/accept", headers=mo.headers)
        assert r.status_code == 200, r.text
        (_, accepted) = await mo_js.wait_changes(2)
        assert accepted["eventType"] == "UPDATE"
        assert accepted["new"]["status"] == "accepted"
        for js in (max_js, wes_js):
            (_, removal) = await js.wait_changes(2)
            assert removal["eventType"] == "DELETE", removal
            assert removal["old"]["id"] == aid
            assert removal["new"] == {}


# --- broadcast and presence --------------------------------------------------------------


@pytest.mark.parametrize("vsn", [None, "1.0.0"], ids=["default-vsn", "vsn-1.0.0"])
async def test_broadcast_reaches_another_client_with_self_and_ack_honoured(
    live: LiveWorld, rtjs: Path, vsn: str | None
) -> None:
    """A realtime-js broadcast (a binary kind-3 push under vsn 2.0.0, JSON text under
    1.0.0) reaches the other client on the topic and no other topic; ``self: true`` echoes
    it to the sender, ``ack: true`` gets the server's ok, and a ``self: false`` sender
    never receives its own message."""
    cara = await live.make("cara", "customer")
    mo = await live.make("mo", "mechanic")
    loud = {"broadcast": {"self": True, "ack": True}}
    quiet = {"broadcast": {"self": False, "ack": False}}
    room: dict[str, Any] = {"changes": [], "vsn": vsn}
    async with (
        js_client(live, rtjs, cara, config=loud, channel="room-1", **room) as a,
        js_client(live, rtjs, mo, config=quiet, channel="room-1", **room) as b,
        js_client(live, rtjs, mo, config=loud, channel="room-2", **room) as other,
    ):
        ping = {"type": "broadcast", "event": "ping", "payload": {"n": 1, "text": "héllo"}}
        assert await a.command("send", message=ping) == "ok"  # the server's ack
        for client in (a, b):
            (got,) = await client.wait_for("ping", lambda c=client: c.of("broadcast"))
            assert {k: got["payload"][k] for k in ("type", "event", "payload")} == ping

        pong = {"type": "broadcast", "event": "pong", "payload": {"n": 2}}
        assert await b.command("send", message=pong) == "ok"  # unacked: resolves at once
        await a.wait_for("pong", lambda: len(a.of("broadcast")) >= 2)
        assert [m["payload"]["event"] for m in a.of("broadcast")] == ["ping", "pong"]
        assert a.of("broadcast")[1]["payload"]["payload"] == {"n": 2}

        # Fences: a message each client gets after the ones it must not have got.
        again = {"type": "broadcast", "event": "again", "payload": {}}
        assert await a.command("send", message=again) == "ok"
        await b.wait_for("again", lambda: len(b.of("broadcast")) >= 2)
        assert [m["payload"]["event"] for m in b.of("broadcast")] == ["ping", "again"]
        fence = {"type": "broadcast", "event": "fence", "payload": {}}
        assert await other.command("send", message=fence) == "ok"
        await other.wait_for("own fence", lambda: other.of("broadcast"))
        assert [m["payload"]["event"] for m in other.of("broadcast")] == ["fence"]

        expected_kinds = {None: [3], "1.0.0": []}[vsn]  # the binary frames each send made
        assert [f["kind"] for f in b.of("sent") if f["binary"]] == expected_kinds
        assert [f["kind"] for f in a.of("sent") if f["binary"]] == expected_kinds * 2


async def test_presence_track_sync_join_and_leave(live: LiveWorld, rtjs: Path) -> None:
    """Two realtime-js clients track(): each sees the other in presenceState() with its
    metadata and gets a join event for it; when one goes away the other gets the leave."""
    cara = await live.make("cara", "customer")
    mo = await live.make("mo", "mechanic")

    def latest_state(client: JsClient) -> dict[str, Any]:
        syncs = [p for p in client.of("presence") if p["event"] == "sync"]
        return syncs[-1]["state"] if syncs else {}

    def both(client: JsClient) -> dict[str, Any] | None:
        state = latest_state(client)
        return state if {"cara", "mo"} <= set(state) else None

    lobby: dict[str, Any] = {"changes": [], "channel": "lobby"}
    async with js_client(live, rtjs, cara, config={"presence": {"key": "cara"}}, **lobby) as a:
        async with js_client(live, rtjs, mo, config={"presence": {"key": "mo"}}, **lobby) as b:
            assert await a.command("track", payload={"role": "customer"}) == "ok"
            assert await b.command("track", payload={"role": "mechanic"}) == "ok"
            for client, other, role in ((a, "mo", "mechanic"), (b, "cara", "customer")):
                state = await client.wait_for("both presences", lambda c=client: both(c))
                assert [m["role"] for m in state[other]] == [role]
                assert all("presence_ref" in m for m in state[other]), state
                joins = [p for p in client.of("presence") if p["event"] == "join"]
                assert other in {j["key"] for j in joins}
                (join,) = [j for j in joins if j["key"] == other]
                assert [m["role"] for m in join["newPresences"]] == [role]
            assert await a.command("state") == latest_state(a)
        # b's process has exited, so its socket is gone.
        leave = await a.wait_for(
            "leave of mo",
            lambda: [p for p in a.of("presence") if p["event"] == "leave" and p["key"] == "mo"],
        )
        assert [m["role"] for m in leave[0]["leftPresences"]] == ["mechanic"]
        await a.wait_for("state without mo", lambda: set(latest_state(a)) == {"cara"})
