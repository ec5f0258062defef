"""Row events over Server-Sent Events, on a real socket: routing, removals, resume, re-sync."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import psycopg

from conftest import SSE, Account, LiveWorld


@asynccontextmanager
async def subscribe(
    client: httpx.AsyncClient,
    live: LiveWorld,
    who: Account | None,
    tables: str = "session_assignments",
    last_event_id: str | None = None,
) -> AsyncIterator[SSE]:
    headers = dict(who.headers) if who else {}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    async with client.stream(
        "GET", f"{live.server.base}/realtime/v1/sse?tables={tables}", headers=headers
    ) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        sse = SSE(response)
        first = await sse.next()
        assert first["event"] == "subscribed"
        yield sse


async def test_queued_request_reaches_exactly_the_mechanics_who_may_take_it(
    live: LiveWorld,
) -> None:
    """After the waiver, mechanics get the request with its summary; other customers get nothing;
    after an accept, the other mechanic receives a removal."""
    customer = await live.make("cara", "customer")
    other_customer = await live.make("olly", "customer")
    mo = await live.make("mo", "mechanic")
    max_ = await live.make("max", "mechanic")
    rita = await live.make("rita", "mechanic", workshop="South")
    async with (
        httpx.AsyncClient(timeout=10) as client,
        subscribe(client, live, mo) as mo_sse,
        subscribe(client, live, max_) as max_sse,
        subscribe(client, live, rita) as rita_sse,
        subscribe(client, live, other_customer) as other_sse,
        subscribe(client, live, customer) as own_sse,
    ):
        pair = await live.queued(client, customer)
        aid = pair["assignment"]["id"]
        for sse in (mo_sse, max_sse, rita_sse):
            (event,) = await sse.changes(1)
            data = event["json"]
            assert data["table"] == "session_assignments" and data["type"] == "UPDATE"
            assert data["record"]["id"] == aid and data["record"]["status"] == "queued"
            assert data["record"]["request_summary"]["customer_first_name"] == "Dana"
            assert data["old_record"] == {}, "the unsigned version was never theirs to see"
            assert event["id"] == str(data["event_id"])
        own = await own_sse.changes(2)
        assert [(e["json"]["type"], e["json"]["record"]["status"]) for e in own] == [
            ("INSERT", "pending_waiver"),
            ("UPDATE", "queued"),
        ]

        r = await client.post(
            f"{live.server.base}/api/assignments/{aid}/accept", headers=mo.headers
        )
        assert r.status_code == 200
        (mine,) = await mo_sse.changes(1)
        assert mine["json"]["type"] == "UPDATE" and mine["json"]["record"]["status"] == "accepted"
        for sse in (max_sse, rita_sse):
            (gone,) = await sse.changes(1)
            assert gone["json"]["type"] == "DELETE"
            assert gone["json"]["old_record"]["id"] == aid
            assert gone["json"]["old_record"]["status"] == "queued"
            assert gone["json"]["record"] == {}
        assert await other_sse.silent(0.5)


async def test_workshop_requests_stay_in_their_workshop(live: LiveWorld) -> None:
    """A workshop's request reaches its mechanics and never another workshop's."""
    customer = await live.make("cara", "customer")
    wes = await live.make("wes", "mechanic", workshop="North")
    rita = await live.make("rita", "mechanic", workshop="South")
    async with (
        httpx.AsyncClient(timeout=10) as client,
        subscribe(client, live, wes) as wes_sse,
        subscribe(client, live, rita) as rita_sse,
    ):
        await live.queued(client, customer, workshop_id=wes.workshop_id)
        (event,) = await wes_sse.changes(1)
        assert event["json"]["record"]["workshop_id"] == str(wes.workshop_id)
        assert await rita_sse.silent(0.5)


async def test_resume_after_disconnect_gets_everything_in_order_once(live: LiveWorld) -> None:
    """A client that was away while 20 requests were queued gets all 20, in order, once."""
    customer = await live.make("cara", "customer")
    mo = await live.make("mo", "mechanic")
    async with httpx.AsyncClient(timeout=10) as client:
        async with subscribe(client, live, mo) as sse:
            await live.queued(client, customer)
            (first,) = await sse.changes(1)
        cursor = first["id"]
        queued = [(await live.queued(client, customer))["assignment"]["id"] for _ in range(20)]
        async with subscribe(client, live, mo, last_event_id=cursor) as sse:
            events = await sse.changes(20)
            assert [e["json"]["record"]["id"] for e in events] == queued
            ids = [int(e["id"]) for e in events]
            assert ids == sorted(ids) and len(set(ids)) == 20 and ids[0] > int(cursor)
            assert await sse.silent(0.5), "nothing is sent twice"


async def test_cursor_older_than_retention_is_told_to_resync(live: LiveWorld) -> None:
    """A cursor from before the pruned horizon gets 409 resync_required, not partial history."""
    mo = await live.make("mo", "mechanic")
    async with await psycopg.AsyncConnection.connect(live.db_url) as conn:
        for _ in range(3):
            await conn.execute(
                "update feature_flags set enabled = not enabled where key = 'mech_audio_alerts'"
            )
            await conn.commit()
        await conn.execute("select realtime.sequence(100000)")
        await conn.commit()
        await conn.execute(
            "update realtime.events set at = now() - interval '30 days' where id is not null"
        )
        await conn.execute("select realtime.prune(interval '7 days')")
        await conn.commit()
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(
            f"{live.server.base}/realtime/v1/sse",
            headers={**mo.headers, "Last-Event-ID": "1"},
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "resync_required"
        r = await client.get(
            f"{live.server.base}/realtime/v1/sse",
            headers={**mo.headers, "Last-Event-ID": "999999"},
        )
        assert r.status_code == 409
        r = await client.get(
            f"{live.server.base}/realtime/v1/sse?tables=profiles", headers=mo.headers
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_table"


async def test_feature_flag_changes_reach_anonymous_subscribers(live: LiveWorld) -> None:
    """Flags are public: a change reaches a subscriber without a token."""
    admin = await live.make("ada", "admin")
    async with (
        httpx.AsyncClient(timeout=10) as client,
        subscribe(client, live, None, tables="feature_flags") as sse,
    ):
        r = await client.patch(
            f"{live.server.base}/api/feature-flags/mech_audio_alerts",
            json={"enabled": False},
            headers=admin.headers,
        )
        assert r.status_code == 200
        (event,) = await sse.changes(1)
        assert event["json"]["record"] == {**event["json"]["record"], "key": "mech_audio_alerts"}
        assert event["json"]["record"]["enabled"] is False
