"""Resume on both transports: a backlog larger than the queue, events committed during the
replay, a prune that commits in the middle of one, and a hole in the live log.

The replay is paced by the client's reading (it waits for room in the client's queue), so
a backlog of any size arrives in full, exactly once and in order, with what committed
meanwhile after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from live_servers import WIRES, serve_live
from prometheus_client import CollectorRegistry
from psycopg.rows import dict_row
from test_ws_protocol import (
    FLAGS,
    WAIT,
    log_head,
    produce_flag_events,
    slow_socket,
)

from autodispatch.db.database import Database
from autodispatch.domain.principal import ANONYMOUS
from autodispatch.realtime.events import Event
from autodispatch.realtime.hub import Hub, RealtimeSettings
from autodispatch.realtime.metrics import RealtimeMetrics
from autodispatch.realtime.protocol import RESUME_FROM_KEY, VSN_2, decode
from conftest import SSE, LiveServer, LiveWorld

QUEUE = 20  # frames a client's queue holds on these servers


async def flag_events(db_url: str, count: int, size: int = 64) -> list[int]:
    """``count`` INSERT events on feature_flags (public: everyone may see them), committed
    in one transaction, each about ``size`` bytes of random text; their event ids."""
    return await produce_flag_events(db_url, count, size)


def resuming(server: LiveServer) -> bool:
    """Whether a subscription of this server is still replaying what it missed (read from
    the test's thread: the set may change meanwhile, so copy it first)."""
    for _ in range(100):
        try:
            subs = list(server.app.state.realtime.router.subscriptions)
        except RuntimeError:
            continue
        return any(sub.buffering for sub in subs)
    raise AssertionError("could not read the server's subscriptions")


@asynccontextmanager
async def sse_stream(
    client: httpx.AsyncClient, server: LiveServer, last_event_id: int
) -> AsyncIterator[SSE]:
    async with client.stream(
        "GET",
        f"{server.base}/realtime/v1/sse?tables=feature_flags",
        headers={"Last-Event-ID": str(last_event_id)},
    ) as response:
        assert response.status_code == 200, await response.aread()
        sse = SSE(response)
        first = await sse.next()
        assert first["event"] == "subscribed"
        assert first["json"] == {"cursor": last_event_id}, "the cursor is the one resumed from"
        yield sse


@pytest.fixture
async def small_queue(db_url: str, tmp_path: Path) -> AsyncIterator[LiveServer]:
    server = LiveServer(db_url, tmp_path, realtime_queue_size=QUEUE)
    try:
        yield server
    finally:
        server.stop()


async def test_sse_resume_with_a_backlog_ten_times_the_queue_gets_all_of_it(
    small_queue: LiveServer, db_url: str
) -> None:
    """Ten queues' worth of missed events reach an SSE client that reads them, in order and
    once each, and its Last-Event-ID then moves past all of them."""
    cursor = await log_head(db_url)
    missed = await flag_events(db_url, QUEUE * 10, size=2048)
    async with (
        httpx.AsyncClient(timeout=30) as client,
        sse_stream(client, small_queue, cursor) as sse,
    ):
        events = await sse.changes(len(missed), timeout=10)
        assert [int(e["id"]) for e in events] == missed
        assert [e["json"]["event_id"] for e in events] == missed
        assert await sse.silent(0.3), "nothing is sent twice"


async def test_sse_resume_gets_events_committed_during_the_replay_once_in_order(
    small_queue: LiveServer, db_url: str
) -> None:
    """Events that commit while a resume is still replaying come after the backlog, each
    once: the client reads slowly at first, so the replay is provably under way."""
    cursor = await log_head(db_url)
    missed = await flag_events(db_url, 1500, size=4096)  # far more than socket buffers hold
    async with (
        httpx.AsyncClient(timeout=30) as client,
        sse_stream(client, small_queue, cursor) as sse,
    ):
        first = await sse.changes(10, timeout=10)
        meanwhile = await flag_events(db_url, 30)
        assert resuming(small_queue), "the replay had finished: this test proves nothing"
        rest: list[dict[str, Any]] = []
        try:
            while len(rest) < len(missed) + len(meanwhile) - 10:
                event = await sse.next(timeout=20)
                if event.get("event") != "postgres_changes":
                    raise AssertionError(f"after {len(rest)} events: {event}")
                rest.append(event)
        except StopAsyncIteration:
            raise AssertionError(f"the stream ended after {len(rest)} more events") from None
        got = [int(e["id"]) for e in first + rest]
        assert got == missed + meanwhile
        live = await flag_events(db_url, 1)
        # The next event is the live one: nothing came twice in between.
        assert [int(e["id"]) for e in await sse.changes(1)] == live


@pytest.fixture(params=WIRES)
async def small_queue_ws(
    db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[LiveWorld]:
    async with serve_live(db_url, tmp_path, request.param, realtime_queue_size=QUEUE) as world:
        yield world


async def test_websocket_resume_gets_events_committed_during_the_replay_once_in_order(
    small_queue_ws: LiveWorld,
) -> None:
    """The same over the WebSocket (native and ASGI): a backlog far larger than the queue,
    plus events committed while it replays, arrive in order, once each, then live ones.
    The client reads nothing for a while (a small receive buffer, one frame queued), so the
    replay is provably still under way when the new events commit."""
    world = small_queue_ws
    server = world.server
    mo = await world.make("mo", "mechanic")
    topic = "realtime:flags"
    cursor = await log_head(world.db_url)
    missed = await flag_events(world.db_url, 1500, size=4096)
    async with slow_socket(server) as (ws, raw):
        ref = raw.ref()
        join = {
            "config": {"postgres_changes": [FLAGS], "presence": {"enabled": False}},
            "access_token": mo.token,
            RESUME_FROM_KEY: cursor,
        }
        await raw.push(topic, "phx_join", join, ref=ref, join_ref=ref)
        while len(raw.rows(topic)) < 10:
            raw.received.append(decode(await asyncio.wait_for(ws.recv(), WAIT), VSN_2))
        assert raw.received[0].payload["status"] == "ok", raw.received[0]
        meanwhile = await flag_events(world.db_url, 30)
        assert resuming(server), "the replay had finished: this test proves nothing"
        raw.start_reading()
        wanted = missed + meanwhile
        rows = await raw.wait_rows(topic, len(wanted))
        assert [r["event_id"] for r in rows] == wanted
        live = await flag_events(world.db_url, 1)
        rows = await raw.wait_rows(topic, len(wanted) + 1)
        assert [r["event_id"] for r in rows] == wanted + live
        await raw.close()


class RecordingSink:
    """Takes every frame at once and remembers it; runs ``on_first`` (awaited) when the
    first event arrives, to commit something at that exact point of a replay."""

    def __init__(self, on_first: Any = None) -> None:
        self.ids: list[int] = []
        self.closed_reason: str | None = None
        self.on_first = on_first

    def offer(self, event: Event, ids: tuple[int, ...], data_json: str) -> bool:
        if self.closed_reason is not None:
            return False
        self.ids.append(event.id)
        return True

    async def wait_offer(
        self, event: Event, ids: tuple[int, ...], data_json: str, timeout: float
    ) -> bool:
        if self.on_first is not None:
            on_first, self.on_first = self.on_first, None
            await on_first()
        return self.offer(event, ids, data_json)

    def close(self, reason: str) -> None:
        self.closed_reason = self.closed_reason or reason


@asynccontextmanager
async def started_hub(db_url: str, **settings: Any) -> AsyncIterator[Hub]:
    db = Database(db_url, min_size=1, max_size=4)
    await db.open()
    hub = Hub(db, RealtimeMetrics(CollectorRegistry()), RealtimeSettings(**settings))
    await hub.start()
    try:
        yield hub
    finally:
        await hub.stop()
        await db.close()


async def prune_through(db_url: str, last: int) -> None:
    """Age events up to ``last`` past the retention window and prune them."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            "update realtime.events set at = now() - interval '30 days' where id <= %s", (last,)
        )
        await conn.execute("select realtime.prune(interval '7 days')")


async def test_a_prune_that_commits_during_a_replay_ends_it_with_resync(db_url: str) -> None:
    """A resume replays page by page; when a prune commits between two pages, the client is
    told to re-sync after a gapless prefix, never handed a history with a hole in it."""
    async with started_hub(db_url, replay_page=5) as hub:
        cursor = await log_head(db_url)
        produced = await flag_events(db_url, 30)
        sink = RecordingSink(on_first=lambda: prune_through(db_url, produced[19]))
        sub = await hub.subscribe(
            ANONYMOUS,
            hub_bindings("feature_flags"),
            sink,
            "test",
            resume_from=cursor,
        )
        await hub.catch_up(sub)
        assert sink.ids == produced[: len(sink.ids)], "what was sent is a gapless prefix"
        assert len(sink.ids) < len(produced)
        assert sink.closed_reason == "resync_required"
        assert sub not in hub.router.subscriptions


async def test_a_hole_in_the_live_log_tells_every_subscriber_to_resync(db_url: str) -> None:
    """When the reader finds events missing between two it read (pruned before it got to
    them), every subscriber is closed with resync_required instead of carrying on."""
    async with started_hub(db_url) as hub:
        sinks = [RecordingSink(), RecordingSink()]
        subs = [
            await hub.subscribe(ANONYMOUS, hub_bindings("feature_flags"), s, "test") for s in sinks
        ]
        produced = await flag_events(db_url, 6)
        await wait_until(lambda: hub.reader.routed >= produced[-1])
        # Events 2..5 vanish before the reader reads them: only the last one is left.
        hub.reader.position = produced[0]
        async with await psycopg.AsyncConnection.connect(
            db_url, autocommit=True, row_factory=dict_row
        ) as conn:
            cur = await conn.execute(
                "select id, at, schema_name, table_name, type, row_id, record, old_record,"
                " new_keys, old_keys from realtime.events where id = %s",
                (produced[-1],),
            )
            last = await cur.fetchone()
        assert last is not None
        await hub.reader.route_all([Event.from_row(last)])
        for sink, sub in zip(sinks, subs, strict=True):
            assert sink.closed_reason == "resync_required"
            assert sub not in hub.router.subscriptions


def hub_bindings(table: str) -> tuple[Any, ...]:
    from autodispatch.realtime.router import Binding

    return (Binding(id=1, table=table, event="*"),)


async def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


async def test_a_client_that_heartbeats_through_a_long_websocket_resume_gets_all(
    small_queue_ws: LiveWorld,
) -> None:
    """A client on a slow link (a small receive buffer, ~400 frames/s) heartbeats every
    0.5 s while a 1,500-event replay keeps its queue full: each heartbeat's reply must
    find room (control frames may pass a queue that rows filled), not close the socket
    as a slow consumer while the client reads."""
    server = small_queue_ws.server
    cursor = await log_head(small_queue_ws.db_url)
    missed = await flag_events(small_queue_ws.db_url, 1500, size=4096)
    async with slow_socket(server) as (ws, raw):
        topic = "realtime:flags"
        ref = raw.ref()
        join = {"config": {"postgres_changes": [FLAGS]}, RESUME_FROM_KEY: cursor}
        await raw.push(topic, "phx_join", join, ref=ref, join_ref=ref)

        async def beat() -> None:
            while True:
                await asyncio.sleep(0.5)
                await raw.push("phoenix", "heartbeat", {})

        beating = asyncio.create_task(beat())
        try:
            while len(raw.rows(topic)) < len(missed):
                frame = await asyncio.wait_for(ws.recv(), WAIT)  # raises once closed
                raw.received.append(decode(frame, VSN_2))
                await asyncio.sleep(0.0025)
        finally:
            beating.cancel()
        assert [r["event_id"] for r in raw.rows(topic)] == missed
        assert raw.matching("phoenix", "phx_reply"), "the heartbeats were answered"
