"""Our WebSocket server at the frame level: a raw ``websockets`` client on a real socket.

Frames are written and read with ``autodispatch.realtime.protocol.encode``/``decode`` (the
server's frames have the client frames' shape in both vsns), so each test states exactly
what goes over the wire. Waiting is on conditions (a frame arriving, a metric moving),
never on fixed sleeps, except where the test paces its own sends under a rate limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from live_servers import NATIVE, WIRES, serve_live
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from autodispatch.realtime.protocol import (
    RESUME_FROM_KEY,
    VSN_1,
    VSN_2,
    Message,
    decode,
    encode,
)
from conftest import SECRET, Account, LiveServer, LiveWorld

WAIT = 15.0
PATHS = ("/realtime/v1/websocket", "/socket/websocket")
ASSIGNMENTS = {"event": "*", "schema": "public", "table": "session_assignments"}
FLAGS = {"event": "*", "schema": "public", "table": "feature_flags"}
FLAG = "mech_audio_alerts"
# The reader waits for room in a full queue, then closes a client that never makes any.
QUEUE_FULL = 'reason="slow_consumer"'


@pytest.fixture(params=WIRES)
async def live(
    db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[LiveWorld]:
    """Each test here runs on the native server (as ``serve`` runs it) and through ASGI."""
    async with serve_live(db_url, tmp_path, request.param) as world:
        yield world


def token_for(account: Account, *, expires_in: float) -> str:
    """A user token like the server's own, expiring ``expires_in`` seconds from now."""
    now = int(time.time())
    claims = {
        "sub": str(account.id),
        "role": "authenticated",
        "aud": "authenticated",
        "email": account.email,
        "iat": now,
        "exp": int(now + expires_in),
        "app_metadata": {"provider": "email", "account_type": account.account_type},
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def anon_key(server: LiveServer) -> str:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{server.base}/api/config")
    assert r.status_code == 200, r.text
    key: str = r.json()["anon_key"]
    return key


class Raw:
    """A raw socket speaking one vsn; a reader task keeps every frame in ``received``."""

    def __init__(self, ws: ClientConnection, vsn: str) -> None:
        self.ws = ws
        self.vsn = vsn
        self.received: list[Message] = []
        self.arrivals: list[float] = []  # time.time() when each received frame was read
        self.closed: ConnectionClosed | None = None  # once the reader saw the end
        self.error: Exception | None = None
        self.done = False
        self.changed = asyncio.Event()
        self._refs = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None

    def start_reading(self) -> None:
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                self.received.append(decode(frame, self.vsn))
                self.arrivals.append(time.time())
                self.changed.set()
        except ConnectionClosed:
            pass
        except Exception as exc:  # a frame our decoder refuses: fail the test with it
            self.error = exc
        finally:
            with contextlib.suppress(Exception):
                self.closed = self.ws.protocol.close_exc
            self.done = True
            self.changed.set()

    def ref(self) -> str:
        return str(next(self._refs))

    async def push(
        self,
        topic: str,
        event: str,
        payload: dict[str, Any],
        *,
        ref: str | None = None,
        join_ref: str | None = None,
    ) -> str:
        ref = ref or self.ref()
        await self.ws.send(encode(Message(join_ref, ref, topic, event, payload), self.vsn))
        return ref

    async def wait_for(self, what: str, condition: Callable[[], Any], timeout: float = WAIT) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            self.changed.clear()
            value = condition()
            if value:
                return value
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0 or (self.done and not self.changed.is_set()):
                raise AssertionError(
                    f"no {what} (waited up to {timeout}s; socket closed: {self.closed},"
                    f" reader error: {self.error});"
                    f" received {self.received}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    def matching(self, topic: str, event: str) -> list[Message]:
        return [m for m in self.received if m.topic == topic and m.event == event]

    async def reply(self, topic: str, ref: str) -> Message:
        """The phx_reply to the push with this ref."""
        (msg,) = await self.wait_for(
            f"reply to {ref} on {topic}",
            lambda: [
                m
                for m in self.received
                if m.event == "phx_reply" and m.topic == topic and m.ref == ref
            ],
        )
        return msg

    async def join(
        self,
        topic: str,
        changes: list[dict[str, Any]] | None = None,
        *,
        token: str | None = None,
        resume_from: int | None = None,
        presence: bool = False,
        broadcast: dict[str, Any] | None = None,
    ) -> Message:
        """Send a phx_join like realtime-js does and return the server's reply."""
        payload: dict[str, Any] = {
            "config": {
                "broadcast": broadcast or {"ack": False, "self": False},
                "presence": {"enabled": presence, "key": ""},
                "postgres_changes": changes or [],
                "private": False,
            },
        }
        if token is not None:
            payload["access_token"] = token
        if resume_from is not None:
            payload[RESUME_FROM_KEY] = resume_from
        ref = self.ref()
        await self.push(topic, "phx_join", payload, ref=ref, join_ref=ref)
        return await self.reply(topic, ref)

    def rows(self, topic: str) -> list[dict[str, Any]]:
        """The ``data`` of every postgres_changes frame received on ``topic``, in order."""
        return [m.payload["data"] for m in self.matching(topic, "postgres_changes")]

    async def wait_rows(self, topic: str, count: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self.wait_for(
            f"{count} rows on {topic}",
            lambda: len(self.rows(topic)) >= count and self.rows(topic),
        )
        return rows

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader


def socket_url(
    server: LiveServer, apikey: str | None, vsn: str | None, path: str = PATHS[0]
) -> str:
    query = []
    if apikey is not None:
        query.append(f"apikey={apikey}")
    if vsn is not None:
        query.append(f"vsn={vsn}")
    return f"{server.ws_base}{path}?{'&'.join(query)}"


@asynccontextmanager
async def raw_socket(
    server: LiveServer,
    vsn: str | None = VSN_2,
    *,
    apikey: str | None = None,
    path: str = PATHS[0],
    **options: Any,
) -> AsyncIterator[Raw]:
    key = apikey if apikey is not None else await anon_key(server)
    async with connect(socket_url(server, key, vsn, path), open_timeout=WAIT, **options) as ws:
        raw = Raw(ws, vsn or VSN_1)
        raw.start_reading()
        try:
            yield raw
        finally:
            await raw.close()


def ok_response(reply: Message) -> dict[str, Any]:
    assert reply.payload["status"] == "ok", reply
    response: dict[str, Any] = reply.payload["response"]
    return response


def error_reason(reply: Message) -> str:
    assert reply.payload["status"] == "error", reply
    reason: str = reply.payload["response"]["reason"]
    return reason


async def set_flag_description(db_url: str, text: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            "update public.feature_flags set description = %s where key = %s", (text, FLAG)
        )


async def log_head(db_url: str) -> int:
    """The log's last id, once every committed event is numbered (as a server's
    sequencer numbers them right after commit: an API call's events may still be
    waiting for it when the call returns)."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("select realtime.sequence(100000)")
        cur = await conn.execute("select last_id from realtime.stream where id = 1")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


# --- framing, joins, leaves -------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("vsn", [VSN_1, VSN_2, None], ids=["vsn1", "vsn2", "no-vsn"])
async def test_heartbeat_is_answered_with_the_same_ref(
    live: LiveWorld, vsn: str | None, path: str
) -> None:
    """A heartbeat on topic phoenix gets an ok phx_reply with an empty response and its
    own ref, on both paths, in both vsns (no vsn meaning 1.0.0, as the Python client)."""
    async with raw_socket(live.server, vsn, path=path) as raw:
        await raw.push("phoenix", "heartbeat", {}, ref="hb-42")
        reply = await raw.reply("phoenix", "hb-42")
        assert reply.payload == {"status": "ok", "response": {}}
        await raw.push("phoenix", "heartbeat", {}, ref="hb-43")
        assert (await raw.reply("phoenix", "hb-43")).payload["status"] == "ok"


async def test_join_reply_echoes_entries_in_order_then_subscribed(live: LiveWorld) -> None:
    """The ok join reply lists every postgres_changes entry as sent, in request order, each
    with a distinct positive integer id, and "Subscribed to PostgreSQL" follows it."""
    mo = await live.make("mo", "mechanic")
    entries = [
        {"event": "UPDATE", "schema": "public", "table": "session_assignments",
         "filter": "status=eq.queued"},
        {"event": "*", "schema": "public", "table": "sessions"},
        {"event": "insert", "table": "session_assignments"},
        {"event": "*", "schema": "public", "table": "feature_flags", "filter": "enabled=eq.true"},
    ]  # fmt: skip
    async with raw_socket(live.server) as raw:
        reply = await raw.join("realtime:queue", entries, token=mo.token)
        echoed = ok_response(reply)["postgres_changes"]
        assert [{k: v for k, v in e.items() if k != "id"} for e in echoed] == entries
        ids = [e["id"] for e in echoed]
        assert all(type(i) is int and i > 0 for i in ids), ids
        assert len(set(ids)) == len(ids)
        (system,) = await raw.wait_for(
            "system message", lambda: raw.matching("realtime:queue", "system")
        )
        assert system.payload == {
            "extension": "postgres_changes",
            "status": "ok",
            "message": "Subscribed to PostgreSQL",
            "channel": "queue",
        }
        assert raw.received.index(reply) < raw.received.index(system)


async def test_subscribed_is_true_when_sent(live: LiveWorld) -> None:
    """A change committed the moment "Subscribed to PostgreSQL" arrives is delivered, every
    time (upstream loses the writes of the first seconds); its data carries an event_id."""
    mo = await live.make("mo", "mechanic")
    customer = await live.make("cara", "customer")
    async with raw_socket(live.server) as raw, httpx.AsyncClient(timeout=10) as http:
        for round_ in range(5):
            topic = f"realtime:round-{round_}"
            ok_response(await raw.join(topic, [FLAGS, ASSIGNMENTS], token=mo.token))
            await raw.wait_for("subscribed", lambda t=topic: raw.matching(t, "system"))
            text = f"right after subscribing {round_} {secrets.token_hex(4)}"
            await set_flag_description(live.db_url, text)
            aid = (await live.queued(http, customer))["assignment"]["id"]
            flag, queued = await raw.wait_rows(topic, 2)
            assert flag["table"] == "feature_flags" and flag["record"]["description"] == text
            assert queued["table"] == "session_assignments" and queued["record"]["id"] == aid
            assert type(flag["event_id"]) is int and queued["event_id"] > flag["event_id"]


async def test_the_native_server_runs_on_uvloop_and_httptools(db_url: str, tmp_path: Path) -> None:
    """uvicorn picks uvloop and httptools whenever they are installed (uvicorn[standard]):
    the realtime WebSocket served on the socket must work on their transports too (they
    are not asyncio.Transport subclasses): join, subscribed, a change delivered."""
    options = {"loop": "uvloop", "http": "httptools"}
    async with serve_live(db_url, tmp_path, NATIVE, uvicorn_options=options) as world:
        mo = await world.make("mo", "mechanic")
        async with raw_socket(world.server) as raw:
            topic = "realtime:on-uvloop"
            ok_response(await raw.join(topic, [FLAGS], token=mo.token))
            await raw.wait_for("subscribed", lambda: raw.matching(topic, "system"))
            await set_flag_description(world.db_url, "on uvloop")
            (flag,) = await raw.wait_rows(topic, 1)
            assert flag["record"]["description"] == "on uvloop"


@pytest.mark.parametrize(
    ("topic", "changes", "token", "code"),
    [
        ("realtime:", [], None, "TopicNameRequired"),
        ("realtime:", [ASSIGNMENTS], None, "TopicNameRequired"),
        ("realtime:x", [{"event": "*", "schema": "public", "table": "profiles"}], None,
         "UnknownTable"),
        ("realtime:x", [{"event": "*", "schema": "auth", "table": "users"}], None,
         "UnknownTable"),
        ("realtime:x", [{**ASSIGNMENTS, "filter": "status=like.q%"}], None, "InvalidFilter"),
        ("realtime:x", [ASSIGNMENTS], "not-a-jwt", "InvalidJWTToken"),
    ],
)  # fmt: skip
async def test_bad_joins_are_refused_with_a_code(
    live: LiveWorld, topic: str, changes: list[dict[str, Any]], token: str | None, code: str
) -> None:
    """A join the server cannot serve gets an error reply "Code: message" with the join's
    ref; the socket stays usable (a heartbeat is still answered)."""
    mo = await live.make("mo", "mechanic")
    async with raw_socket(live.server) as raw:
        reply = await raw.join(topic, changes, token=token or mo.token)
        assert error_reason(reply).startswith(f"{code}: "), reply
        assert raw.matching(topic, "system") == []
        await raw.push("phoenix", "heartbeat", {}, ref="after")
        assert (await raw.reply("phoenix", "after")).payload["status"] == "ok"


async def test_push_on_an_unjoined_topic_is_unmatched(live: LiveWorld) -> None:
    """A broadcast or leave on a topic the socket never joined gets the error reply
    "unmatched topic" with the push's ref."""
    async with raw_socket(live.server, VSN_1) as raw:
        ref = await raw.push(
            "realtime:nowhere", "broadcast", {"type": "broadcast", "event": "e", "payload": {}}
        )
        reply = await raw.reply("realtime:nowhere", ref)
        assert reply.payload == {"status": "error", "response": {"reason": "unmatched topic"}}
        ref = await raw.push("realtime:nowhere", "phx_leave", {})
        assert error_reason(await raw.reply("realtime:nowhere", ref)) == "unmatched topic"


async def test_leave_replies_ok_then_closes_the_channel(live: LiveWorld) -> None:
    """phx_leave gets an ok reply, then phx_close carrying the join's ref; the channel is
    gone afterwards (its events stop, a push on it is unmatched)."""
    mo = await live.make("mo", "mechanic")
    async with raw_socket(live.server) as raw:
        join = await raw.join("realtime:q", [FLAGS], token=mo.token)
        ok_response(join)
        ref = await raw.push("realtime:q", "phx_leave", {}, join_ref=join.join_ref)
        leave = await raw.reply("realtime:q", ref)
        assert leave.payload == {"status": "ok", "response": {}}
        (close,) = await raw.wait_for("phx_close", lambda: raw.matching("realtime:q", "phx_close"))
        assert raw.received.index(leave) < raw.received.index(close)
        assert close.join_ref == join.join_ref and close.payload == {}
        await set_flag_description(live.db_url, "after the leave")
        ref = await raw.push("realtime:q", "phx_leave", {})
        assert error_reason(await raw.reply("realtime:q", ref)) == "unmatched topic"
        ok_response(await raw.join("realtime:fence", [FLAGS], token=mo.token))
        await set_flag_description(live.db_url, "fence")
        await raw.wait_rows("realtime:fence", 1)
        assert raw.rows("realtime:q") == []


async def test_a_rejoin_of_the_same_topic_gets_binding_ids_the_old_channel_never_had(
    live: LiveWorld,
) -> None:
    """Frames of the left channel may still be on the wire when the same topic is joined
    again. Postgres-changes frames carry no join_ref, so clients (realtime-js matches a
    frame's ids against its bindings) tell them apart by their binding ids: those of a
    connection are never reused."""
    mo = await live.make("mo", "mechanic")
    async with raw_socket(live.server) as raw:
        first = ok_response(await raw.join("realtime:q", [FLAGS], token=mo.token))
        await set_flag_description(live.db_url, "for the first channel")
        await raw.push("realtime:q", "phx_leave", {})
        second = await raw.join("realtime:q", [FLAGS], token=mo.token)
        old_ids = {e["id"] for e in first["postgres_changes"]}
        new_ids = {e["id"] for e in ok_response(second)["postgres_changes"]}
        assert old_ids.isdisjoint(new_ids), (old_ids, new_ids)
        await set_flag_description(live.db_url, "for the second channel")
        await raw.wait_for(
            "the second channel's row",
            lambda: any(
                m.payload["ids"] == sorted(new_ids)
                for m in raw.matching("realtime:q", "postgres_changes")
            ),
        )


# --- authentication ---------------------------------------------------------------------


async def expect_refused(url: str, **options: Any) -> tuple[int, Any]:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, open_timeout=WAIT, **options):
            pass
    response = info.value.response
    return response.status_code, json.loads(response.body or b"null")


async def test_bad_apikeys_are_refused_with_401_on_the_upgrade(live: LiveWorld) -> None:
    """A missing, invalid or expired apikey is an HTTP 401 with {"error": ...} on the
    upgrade itself, on both paths; a valid x-api-key header wins over a bad query key."""
    cara = await live.make("cara", "customer")
    server = live.server
    expired = token_for(cara, expires_in=-60)
    forged = jwt.encode(
        {"sub": str(cara.id), "role": "authenticated", "exp": int(time.time()) + 600},
        "not-the-secret-" + "y" * 40,
        algorithm="HS256",
    )
    for path in PATHS:
        for key in (None, "", "not-a-jwt", forged, expired):
            status, body = await expect_refused(socket_url(server, key, VSN_2, path))
            assert status == 401, (path, key, status, body)
            assert isinstance(body["error"], str) and body["error"], body
    status, body = await expect_refused(socket_url(server, expired, VSN_2))
    assert "expired" in body["error"]
    url = socket_url(server, "not-a-jwt", VSN_2)
    headers = {"x-api-key": await anon_key(server)}
    async with connect(url, additional_headers=headers, open_timeout=WAIT) as ws:
        raw = Raw(ws, VSN_2)
        raw.start_reading()
        await raw.push("phoenix", "heartbeat", {}, ref="1")
        assert (await raw.reply("phoenix", "1")).payload["status"] == "ok"
        await raw.close()


async def test_an_unknown_vsn_and_a_full_gateway_are_refused_on_the_upgrade(
    live: LiveWorld,
) -> None:
    """With a valid apikey, an unknown vsn is an HTTP 400 UnsupportedVsn, and a gateway at
    its connection limit an HTTP 429 ConnectionRateLimitReached, each with {"error": ...}
    on the upgrade itself; under the limit the same socket opens."""
    server = live.server
    key = await anon_key(server)
    status, body = await expect_refused(socket_url(server, key, "3.0.0"))
    assert status == 400, (status, body)
    assert body["error"].startswith("UnsupportedVsn"), body
    limits = server.app.state.gateway.limits
    allowed, limits.connections = limits.connections, 0
    try:
        status, body = await expect_refused(socket_url(server, key, VSN_2))
    finally:
        limits.connections = allowed
    assert status == 429, (status, body)
    assert body["error"].startswith("ConnectionRateLimitReached"), body
    async with raw_socket(server) as raw:
        await raw.push("phoenix", "heartbeat", {}, ref="1")
        assert (await raw.reply("phoenix", "1")).payload["status"] == "ok"
        await raw.close()


async def expect_expiry(raw: Raw, topic: str) -> tuple[Message, Message, float]:
    """The system error then phx_close that end an expired channel, and when they came."""
    system, close = await raw.wait_for(
        "system error and phx_close",
        lambda: (
            ((s := raw.matching(topic, "system")) and (c := raw.matching(topic, "phx_close")))
            and (s[-1], c[-1])
        ),
    )
    arrived = raw.arrivals[raw.received.index(system)]
    assert raw.received.index(system) < raw.received.index(close)
    assert system.payload["extension"] == "system"
    assert system.payload["status"] == "error"
    assert "Token has expired" in system.payload["message"], system
    assert system.payload["channel"] == topic.removeprefix("realtime:")
    return system, close, arrived


async def test_a_refreshed_token_that_expires_closes_the_channel(live: LiveWorld) -> None:
    """After an access_token push with a token good for 2 s, the channel keeps working
    until then; past the expiry the server sends a system "Token has expired" error and
    phx_close, and stops delivering."""
    mo = await live.make("mo", "mechanic")
    topic = "realtime:short"
    async with raw_socket(live.server) as raw:
        join = await raw.join(topic, [FLAGS], token=mo.token)
        ok_response(join)
        short = token_for(mo, expires_in=2)
        expires_at = jwt.decode(short, options={"verify_signature": False})["exp"]
        await raw.push(topic, "access_token", {"access_token": short}, join_ref=join.join_ref)
        await set_flag_description(live.db_url, "while the short token is valid")
        await raw.wait_rows(topic, 1)
        assert raw.matching(topic, "system")[0].payload["status"] == "ok"  # "Subscribed..."
        _, close, arrived = await expect_expiry(raw, topic)
        assert arrived >= expires_at - 0.05, (arrived, expires_at)
        assert close.join_ref == join.join_ref
        await set_flag_description(live.db_url, "after the expiry")
        ok_response(await raw.join("realtime:fence", [FLAGS], token=mo.token))
        await set_flag_description(live.db_url, "fence")
        await raw.wait_rows("realtime:fence", 1)
        assert len(raw.rows(topic)) == 1


@pytest.mark.parametrize("bad", ["not-a-jwt", "expired", "forged"])
async def test_an_invalid_access_token_push_closes_the_channel(live: LiveWorld, bad: str) -> None:
    """An access_token push with an invalid or expired token ends the channel at once: a
    system "Token has expired" error, then phx_close."""
    mo = await live.make("mo", "mechanic")
    token = {
        "not-a-jwt": "not-a-jwt",
        "expired": token_for(mo, expires_in=-5),
        "forged": jwt.encode(
            {"sub": str(mo.id), "role": "authenticated", "exp": int(time.time()) + 600},
            "another-secret-" + "z" * 40,
            algorithm="HS256",
        ),
    }[bad]
    topic = "realtime:bad-token"
    async with raw_socket(live.server, VSN_1) as raw:
        join = await raw.join(topic, [FLAGS], token=mo.token)
        ok_response(join)
        await raw.push(topic, "access_token", {"access_token": token}, join_ref=join.join_ref)
        _, close, _ = await expect_expiry(raw, topic)
        assert close.join_ref == join.join_ref


# --- resume -----------------------------------------------------------------------------


async def test_resume_delivers_exactly_what_was_missed_then_live_events(live: LiveWorld) -> None:
    """A mechanic who rejoins with autodispatch_resume_from = the last event id it saw gets
    exactly the 20 requests queued while it was away, in order, without duplicates, each
    with its event_id, then live events."""
    mo = await live.make("mo", "mechanic")
    customer = await live.make("cara", "customer")
    topic = "realtime:mechanic-queue"
    async with httpx.AsyncClient(timeout=10) as http:
        async with raw_socket(live.server) as raw:
            ok_response(await raw.join(topic, [ASSIGNMENTS], token=mo.token))
            await raw.wait_for("subscribed", lambda: raw.matching(topic, "system"))
            first = (await live.queued(http, customer))["assignment"]["id"]
            (seen,) = await raw.wait_rows(topic, 1)
            assert seen["record"]["id"] == first
            cursor = seen["event_id"]
        missed = [(await live.queued(http, customer))["assignment"]["id"] for _ in range(20)]
        async with raw_socket(live.server, VSN_1) as raw:
            reply = await raw.join(topic, [ASSIGNMENTS], token=mo.token, resume_from=cursor)
            ok_response(reply)
            rows = await raw.wait_rows(topic, 20)
            assert [r["record"]["id"] for r in rows] == missed
            assert all(r["type"] == "UPDATE" and r["record"]["status"] == "queued" for r in rows)
            event_ids = [r["event_id"] for r in rows]
            assert event_ids == sorted(set(event_ids)) and event_ids[0] > cursor
            assert raw.received.index(reply) < min(
                i for i, m in enumerate(raw.received) if m.event == "postgres_changes"
            )
            live_one = (await live.queued(http, customer))["assignment"]["id"]
            rows = await raw.wait_rows(topic, 21)
            assert rows[20]["record"]["id"] == live_one and rows[20]["event_id"] > event_ids[-1]
            ok_response(await raw.join("realtime:fence", [FLAGS], token=mo.token))
            await set_flag_description(live.db_url, "fence")
            await raw.wait_rows("realtime:fence", 1)
            assert len(raw.rows(topic)) == 21


async def test_a_cursor_ahead_of_the_log_needs_a_resync(live: LiveWorld) -> None:
    """A resume cursor beyond the log's last event (another database's) is refused with
    ResyncRequired, and the topic is left unjoined."""
    mo = await live.make("mo", "mechanic")
    head = await log_head(live.db_url)
    async with raw_socket(live.server) as raw:
        reply = await raw.join(
            "realtime:ahead", [ASSIGNMENTS], token=mo.token, resume_from=head + 1000
        )
        assert error_reason(reply).startswith("ResyncRequired: "), reply
        ref = await raw.push("realtime:ahead", "phx_leave", {})
        assert error_reason(await raw.reply("realtime:ahead", ref)) == "unmatched topic"


# --- limits -----------------------------------------------------------------------------


async def test_too_many_channels_is_refused(live: LiveWorld) -> None:
    """The 101st channel on one socket is refused with ChannelRateLimitReached (joins are
    paced under the 50-per-second join limit); the first 100 are all joined."""
    async with raw_socket(live.server) as raw:
        window_start = time.monotonic()
        for n in range(101):
            if n and n % 40 == 0:  # stay under 50 joins in any one-second window
                await asyncio.sleep(max(0.0, window_start + 1.1 - time.monotonic()))
                window_start = time.monotonic()
            reply = await raw.join(f"realtime:room-{n}")
            if n < 100:
                ok_response(reply)
        assert error_reason(reply).startswith("ChannelRateLimitReached: "), reply
        # Replacing a joined topic is not a new channel.
        await asyncio.sleep(max(0.0, window_start + 1.1 - time.monotonic()))
        ok_response(await raw.join("realtime:room-0"))


async def test_bursts_above_the_message_and_join_limits_are_refused(live: LiveWorld) -> None:
    """More than 500 messages (or 50 joins) sent at once: the excess is refused with
    MessagePerSecondRateLimitReached (ClientJoinRateLimitReached), the rest answered; a
    second later the socket may send again."""
    async with raw_socket(live.server, VSN_1) as raw:
        refs = [await raw.push("realtime:nowhere", "broadcast", {"event": "x"}) for _ in range(700)]
        replies = [await raw.reply("realtime:nowhere", ref) for ref in refs]
        reasons = [r.payload["response"]["reason"] for r in replies]
        limited = [r for r in reasons if r.startswith("MessagePerSecondRateLimitReached: ")]
        assert limited, "700 messages at once were all accepted"
        assert len(limited) < 700 - 400, "the first messages of a burst are answered"
        assert set(reasons) - set(limited) == {"unmatched topic"}
        await asyncio.sleep(1.2)
        ref = await raw.push("realtime:nowhere", "broadcast", {"event": "x"})
        assert error_reason(await raw.reply("realtime:nowhere", ref)) == "unmatched topic"
    async with raw_socket(live.server, VSN_1) as raw:
        joins = [raw.join(f"realtime:burst-{n}") for n in range(70)]
        reasons = [r.payload["status"] for r in await asyncio.gather(*joins)]
        refused = [
            m for m in raw.received
            if m.event == "phx_reply" and m.payload["status"] == "error"
        ]  # fmt: skip
        assert refused and all(
            error_reason(m).startswith("ClientJoinRateLimitReached: ") for m in refused
        ), refused
        assert reasons.count("ok") >= 50


async def test_a_silent_socket_is_dropped_and_a_heartbeating_one_is_not(
    live: LiveWorld,
) -> None:
    """A socket that sends nothing for longer than the heartbeat timeout is closed (reason
    heartbeat_timeout); one that sends heartbeats stays open."""
    live.server.app.state.gateway.limits.heartbeat_timeout = 1.5
    async with raw_socket(live.server) as silent, raw_socket(live.server) as beating:
        started = time.monotonic()
        while not silent.done:
            assert time.monotonic() - started < WAIT, "the silent socket was never dropped"
            await beating.push("phoenix", "heartbeat", {}, ref=beating.ref())
            await asyncio.sleep(0.4)
        assert silent.closed is not None and silent.closed.rcvd is not None, silent.closed
        assert silent.closed.rcvd.reason == "heartbeat_timeout"
        assert time.monotonic() - started > 1.4
        assert not beating.done


async def test_frames_above_the_payload_limit_are_refused(live: LiveWorld) -> None:
    """A frame above payload_bytes (256 KiB) is refused with PayloadTooLarge and not
    broadcast; the socket stays usable."""
    async with (
        raw_socket(live.server) as sender,
        raw_socket(live.server) as listener,
    ):
        ok_response(await sender.join("realtime:big"))
        ok_response(await listener.join("realtime:big"))
        huge = {"type": "broadcast", "event": "huge", "payload": {"blob": "x" * 300_000}}
        await sender.push("realtime:big", "broadcast", huge)
        (refusal,) = await sender.wait_for(
            "PayloadTooLarge",
            lambda: [
                m
                for m in sender.received
                if m.event == "phx_reply"
                and m.payload.get("status") == "error"
                and m.payload["response"]["reason"].startswith("PayloadTooLarge: ")
            ],
        )
        assert refusal.payload["response"]["reason"].startswith("PayloadTooLarge: ")
        small = {"type": "broadcast", "event": "small", "payload": {"n": 1}}
        await sender.push("realtime:big", "broadcast", small)
        (got,) = await listener.wait_for(
            "small broadcast", lambda: listener.matching("realtime:big", "broadcast")
        )
        assert got.payload["event"] == "small"


async def test_a_broadcast_too_big_for_the_bus_is_refused_and_reaches_nobody(
    live: LiveWorld,
) -> None:
    """A broadcast under payload_bytes but over the 8000-byte NOTIFY limit of the bus is
    refused with PayloadTooLarge in reply to its push, and no subscriber gets it."""
    async with (
        raw_socket(live.server) as sender,
        raw_socket(live.server) as listener,
    ):
        ok_response(await sender.join("realtime:bus", broadcast={"ack": True, "self": False}))
        ok_response(await listener.join("realtime:bus"))
        big = {"type": "broadcast", "event": "big", "payload": {"blob": "x" * 20_000}}
        ref = await sender.push("realtime:bus", "broadcast", big)
        assert error_reason(await sender.reply("realtime:bus", ref)).startswith("PayloadTooLarge: ")
        small = {"type": "broadcast", "event": "small", "payload": {}}
        ref = await sender.push("realtime:bus", "broadcast", small)
        ok_response(await sender.reply("realtime:bus", ref))
        await listener.wait_for(
            "small broadcast",
            lambda: [
                m for m in listener.matching("realtime:bus", "broadcast")
                if m.payload["event"] == "small"
            ],
        )  # fmt: skip
        assert [m.payload["event"] for m in listener.matching("realtime:bus", "broadcast")] == [
            "small"
        ]


async def test_a_presence_too_big_for_the_bus_is_refused_and_never_listed(
    live: LiveWorld,
) -> None:
    """A track whose meta cannot travel between servers is refused with PayloadTooLarge
    (not an internal error), and is listed nowhere; a small track afterwards is."""
    async with raw_socket(live.server) as tracker, raw_socket(live.server) as watcher:
        ok_response(await tracker.join("realtime:room", presence=True))
        ok_response(await watcher.join("realtime:room", presence=True))
        big = {"type": "presence", "event": "track", "payload": {"blob": "x" * 20_000}}
        ref = await tracker.push("realtime:room", "presence", big)
        assert error_reason(await tracker.reply("realtime:room", ref)).startswith(
            "PayloadTooLarge: "
        )
        small = {"type": "presence", "event": "track", "payload": {"size": "small"}}
        ref = await tracker.push("realtime:room", "presence", small)
        ok_response(await tracker.reply("realtime:room", ref))
        diffs = await watcher.wait_for(
            "the small track's diff",
            lambda: [m for m in watcher.matching("realtime:room", "presence_diff")
                     if m.payload["joins"]],
        )  # fmt: skip
        metas = [meta for d in diffs for e in d.payload["joins"].values() for meta in e["metas"]]
        assert [meta.get("size") for meta in metas] == ["small"]
        assert not any("blob" in meta for meta in metas)


# --- slow consumers ---------------------------------------------------------------------


@pytest.fixture(params=WIRES)
async def small_queue_server(
    db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[LiveWorld]:
    """A live server whose per-connection queue holds 20 frames."""
    async with serve_live(db_url, tmp_path, request.param, realtime_queue_size=20) as world:
        yield world


async def metric(server: LiveServer, name: str, labels: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{server.base}/metrics")).text
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    return 0.0


@asynccontextmanager
async def slow_socket(server: LiveServer) -> AsyncIterator[tuple[Any, Raw]]:
    """An anonymous vsn 2 socket with a tiny receive buffer, a one-frame client queue and
    no compression: once the test stops reading, the server's writes block soon."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    url = socket_url(server, await anon_key(server), VSN_2)
    async with connect(url, sock=sock, compression=None, max_queue=1, open_timeout=WAIT) as ws:
        yield ws, Raw(ws, VSN_2)


async def produce_flag_events(db_url: str, count: int, size: int) -> list[int]:
    """``count`` new feature flags in one transaction (so ``count`` INSERT events that
    everyone may see), each with a random description of about ``size`` hex characters
    (random, so compression cannot shrink it); returns their event ids."""
    prefix = f"burst_{secrets.token_hex(4)}_"
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            """
            insert into public.feature_flags (key, description)
            select %(prefix)s || g,
                   (select string_agg(md5(random()::text || g || i), '')
                    from generate_series(1, %(chunks)s) i)
            from generate_series(1, %(count)s) g
            order by g
            """,
            {"prefix": prefix, "chunks": max(1, size // 32), "count": count},
        )
        # Numbered now, as the writing process's sequencer would (db/sequencer.py).
        await conn.execute("select realtime.sequence(100000)")
        cur = await conn.execute(
            "select id from realtime.events where table_name = 'feature_flags'"
            " and row_id like %s order by id",
            (prefix + "%",),
        )
        ids = [int(r[0]) for r in await cur.fetchall()]
    assert len(ids) == count and ids == list(range(ids[0], ids[0] + count)), ids[:5]
    return ids


async def test_a_slow_consumer_is_closed_and_resumes_without_loss(
    small_queue_server: LiveWorld,
) -> None:
    """A client that stops reading while many events are produced is closed with code 4000
    once its queue overflows; what it received is a gapless prefix, and rejoining from its
    last event id delivers the rest, in order, without duplicates."""
    world = small_queue_server
    server = world.server
    mo = await world.make("mo", "mechanic")
    topic = "realtime:flags"
    async with slow_socket(server) as (ws, slow):
        ref = slow.ref()
        join_payload = {
            "config": {"postgres_changes": [FLAGS], "presence": {"enabled": False}},
            "access_token": mo.token,
        }
        await slow.push(topic, "phx_join", join_payload, ref=ref, join_ref=ref)
        # Read the join reply and the system message, then stop reading.
        for _ in range(2):
            slow.received.append(decode(await asyncio.wait_for(ws.recv(), WAIT), VSN_2))
        assert slow.received[0].payload["status"] == "ok", slow.received
        produced = await produce_flag_events(world.db_url, count=600, size=8192)
        deadline = time.monotonic() + WAIT
        while await metric(server, "autodispatch_realtime_not_delivered_total", QUEUE_FULL) < 1:
            assert time.monotonic() < deadline, "the server never found the queue full"
            await asyncio.sleep(0.05)
        slow.start_reading()
        await slow.wait_for("the close", lambda: slow.done)
    assert slow.closed is not None and slow.closed.rcvd is not None, slow.closed
    assert slow.closed.rcvd.code == 4000, slow.closed
    got = [r["event_id"] for r in slow.rows(topic)]
    assert got == produced[: len(got)], "what a slow consumer received is a gapless prefix"
    assert len(got) < len(produced)
    cursor = got[-1] if got else produced[0] - 1
    resumed = await resume_until_caught_up(server, mo, topic, cursor, len(produced) - len(got))
    assert got + resumed == produced


async def resume_until_caught_up(
    server: LiveServer, who: Account, topic: str, cursor: int, expected: int
) -> list[int]:
    """Rejoin from ``cursor`` like a client would after a 4000 close (again after each such
    close, as long as it makes progress) until ``expected`` events came; their ids."""
    ids: list[int] = []
    attempts: list[str] = []
    while len(ids) < expected:
        wanted = expected - len(ids)
        async with raw_socket(server) as raw:
            reply_task = asyncio.create_task(
                raw.join(topic, [FLAGS], token=who.token, resume_from=cursor)
            )
            with contextlib.suppress(AssertionError):
                await raw.wait_for(
                    f"{wanted} resumed events or a close",
                    lambda r=raw, n=wanted: r.done or len(r.rows(topic)) >= n,  # type: ignore[misc]
                )
            reply_task.cancel()
            with contextlib.suppress(BaseException):
                await reply_task
            new = [r["event_id"] for r in raw.rows(topic)]
            code = raw.closed.rcvd.code if raw.closed and raw.closed.rcvd else None
            attempts.append(
                f"from {cursor}: {len(new)} events, join replies"
                f" {[m.payload for m in raw.matching(topic, 'phx_reply')]}, close {code}"
            )
        ids += new
        if not new:
            raise AssertionError(
                f"resuming makes no progress ({expected - len(ids)} of {expected} events"
                f" missing); attempts: {attempts}"
            )
        cursor = new[-1]
    return ids


async def test_a_resume_backlog_larger_than_the_queue_is_delivered(
    small_queue_server: LiveWorld,
) -> None:
    """A client that reads promptly and resumes with more missed events than its queue holds
    (20 here) still gets all of them: the replay must not overflow its own queue."""
    world = small_queue_server
    mo = await world.make("mo", "mechanic")
    topic = "realtime:flags"
    cursor = await log_head(world.db_url)
    produced = await produce_flag_events(world.db_url, count=50, size=32)
    async with raw_socket(world.server) as raw:
        ok_response(await raw.join(topic, [FLAGS], token=mo.token, resume_from=cursor))
        rows = await raw.wait_rows(topic, 50)
        assert [r["event_id"] for r in rows] == produced
        assert not raw.done


async def test_a_prompt_reader_survives_a_burst_larger_than_its_queue(
    small_queue_server: LiveWorld,
) -> None:
    """A client that reads promptly is not a slow consumer: one transaction of 50 events it
    may see (more than its 20-frame queue) reaches it in full, and it stays connected."""
    world = small_queue_server
    mo = await world.make("mo", "mechanic")
    topic = "realtime:flags"
    async with raw_socket(world.server) as raw:
        ok_response(await raw.join(topic, [FLAGS], token=mo.token))
        await raw.wait_for("subscribed", lambda: raw.matching(topic, "system"))
        produced = await produce_flag_events(world.db_url, count=50, size=32)
        rows = await raw.wait_rows(topic, 50)
        assert [r["event_id"] for r in rows] == produced
        assert not raw.done
