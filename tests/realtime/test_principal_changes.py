"""When what a user may see changes mid-stream, their live subscriptions follow at once.

A workshop mechanic moved to another workshop, a mechanic made a customer, an account
disabled: each is changed by SQL (as an operator would), and on both transports the
subscriber gets a removal for each row that left its view, then nothing more of those
rows, while rows it may still see keep coming. Row-level security is the reference: the
queue read through the API says the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from live_servers import NATIVE, WIRES, serve_live
from test_ws_protocol import ASSIGNMENTS, FLAGS, log_head, raw_socket

from conftest import SSE, Account, LiveWorld

NextRows = Callable[[int], Awaitable[list[dict[str, Any]]]]
FLAG = "mech_audio_alerts"
SSE_TRANSPORT = "sse"


@pytest.fixture(params=(SSE_TRANSPORT, *WIRES))
async def transport(
    db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[str, LiveWorld]]:
    """SSE, and the WebSocket served natively and through ASGI."""
    wire = NATIVE if request.param == SSE_TRANSPORT else request.param
    async with serve_live(db_url, tmp_path, wire) as world:
        yield request.param, world


@asynccontextmanager
async def subscribed(
    kind: str, world: LiveWorld, who: Account, resume_from: int | None = None
) -> AsyncIterator[NextRows]:
    """A live subscription to session_assignments and feature_flags as ``who`` (resuming
    after ``resume_from`` when given); yields a function returning the next ``n`` row
    events (their ``data``), in order."""
    if kind == SSE_TRANSPORT:
        resume = {} if resume_from is None else {"Last-Event-ID": str(resume_from)}
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream(
                "GET",
                f"{world.server.base}/realtime/v1/sse?tables=session_assignments,feature_flags",
                headers={**who.headers, **resume},
            ) as response,
        ):
            assert response.status_code == 200
            sse = SSE(response)
            assert (await sse.next())["event"] == "subscribed"

            async def next_sse(n: int) -> list[dict[str, Any]]:
                events = await sse.changes(n)
                for event in events:
                    # A removal before the last of a key change carries no cursor.
                    assert ("id" in event) == ("event_id" in event["json"]), event
                return [e["json"] for e in events]

            yield next_sse
        return
    async with raw_socket(world.server) as raw:
        topic = "realtime:queue"
        reply = await raw.join(
            topic, [ASSIGNMENTS, FLAGS], token=who.token, resume_from=resume_from
        )
        assert reply.payload["status"] == "ok", reply
        await raw.wait_for("subscribed", lambda: raw.matching(topic, "system"))
        taken = 0

        async def next_ws(n: int) -> list[dict[str, Any]]:
            nonlocal taken
            rows = (await raw.wait_rows(topic, taken + n))[taken : taken + n]
            taken += n
            return rows

        yield next_ws


async def sql(world: LiveWorld, statement: str, *params: Any) -> None:
    async with await psycopg.AsyncConnection.connect(world.db_url, autocommit=True) as conn:
        await conn.execute(statement, params)


async def fence(world: LiveWorld, rows: NextRows) -> list[dict[str, Any]]:
    """Change a feature flag (everyone sees it) and return every row event up to it: what
    arrived in between, the flag's own event last."""
    await sql(
        world,
        "update public.feature_flags set description = md5(random()::text) where key = %s",
        FLAG,
    )
    found: list[dict[str, Any]] = []
    while not found or found[-1]["table"] != "feature_flags":
        found += await rows(1)
    return found[:-1]


async def queue_ids(world: LiveWorld, who: Account) -> set[str]:
    """The requests RLS shows in the mechanic's queue now."""
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{world.server.base}/api/mechanic/queue", headers=who.headers)
    if r.status_code != 200:
        return set()
    return {a["id"] for a in r.json()["items"]}


def removal_ids(rows: list[dict[str, Any]]) -> list[str]:
    assert all(r["type"] == "DELETE" for r in rows), rows
    return sorted(r["old_record"]["id"] for r in rows)


async def test_a_mechanic_moved_to_another_workshop_stops_getting_the_old_ones_requests(
    transport: tuple[str, LiveWorld],
) -> None:
    """The old workshop's queued request is removed at once; its next one never arrives;
    the new workshop's and general requests do."""
    kind, world = transport
    customer = await world.make("cara", "customer")
    rita = await world.make("rita", "mechanic", workshop="South")
    nora = await world.make("nora", "mechanic", workshop="North")
    async with httpx.AsyncClient(timeout=10) as http, subscribed(kind, world, rita) as rows:
        south = (await world.queued(http, customer, rita.workshop_id))["assignment"]["id"]
        general = (await world.queued(http, customer))["assignment"]["id"]
        assert [r["record"]["id"] for r in await rows(2)] == [south, general]

        await sql(
            world,
            "update public.mechanics set workshop_id = %s where user_id = %s",
            nora.workshop_id,
            rita.id,
        )
        assert removal_ids(await fence(world, rows)) == [south]
        assert await queue_ids(world, rita) == {general}, "RLS agrees"

        await world.queued(http, customer, rita.workshop_id)  # South: no longer hers
        north = (await world.queued(http, customer, nora.workshop_id))["assignment"]["id"]
        (event,) = await rows(1)
        assert event["record"]["id"] == north and event["type"] == "UPDATE"
        assert await fence(world, rows) == []


async def test_a_mechanic_made_a_customer_loses_the_queue_and_their_session(
    transport: tuple[str, LiveWorld],
) -> None:
    """Queued requests and the session they accepted are removed; new requests stop."""
    kind, world = transport
    customer = await world.make("cara", "customer")
    mo = await world.make("mo", "mechanic")
    async with httpx.AsyncClient(timeout=10) as http, subscribed(kind, world, mo) as rows:
        waiting = (await world.queued(http, customer))["assignment"]["id"]
        taken = (await world.queued(http, customer))["assignment"]["id"]
        r = await http.post(
            f"{world.server.base}/api/assignments/{taken}/accept", headers=mo.headers
        )
        assert r.status_code == 200, r.text
        seen = await rows(3)
        assert [(e["record"]["id"], e["record"]["status"]) for e in seen] == [
            (waiting, "queued"),
            (taken, "queued"),
            (taken, "accepted"),
        ]

        await sql(
            world, "update public.profiles set account_type = 'customer' where id = %s", mo.id
        )
        assert removal_ids(await fence(world, rows)) == sorted([waiting, taken])

        await world.queued(http, customer)
        assert await fence(world, rows) == [], "no request reaches a customer's queue"


async def test_a_disabled_account_gets_removals_then_only_public_rows(
    transport: tuple[str, LiveWorld],
) -> None:
    """Disabling an account removes everything it could see; afterwards only public rows
    (feature flags) reach it, and it can no longer sign in."""
    kind, world = transport
    customer = await world.make("cara", "customer")
    rita = await world.make("rita", "mechanic", workshop="South")
    async with httpx.AsyncClient(timeout=10) as http, subscribed(kind, world, rita) as rows:
        mine = (await world.queued(http, customer, rita.workshop_id))["assignment"]["id"]
        general = (await world.queued(http, customer))["assignment"]["id"]
        assert len(await rows(2)) == 2

        await sql(world, "update auth.users set disabled_at = now() where id = %s", rita.id)
        assert removal_ids(await fence(world, rows)) == sorted([mine, general])
        await world.queued(http, customer)
        assert await fence(world, rows) == []

        r = await http.post(
            f"{world.server.base}/auth/v1/token?grant_type=password",
            json={"email": rita.email, "password": "password-123"},
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "account_disabled", r.text


def changes_of(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["type"], (r["record"] or r["old_record"])["id"]) for r in rows]


async def test_a_resume_across_moves_gets_what_a_live_subscriber_got(
    transport: tuple[str, LiveWorld],
) -> None:
    """Rita is moved South -> North -> East while one of her pages is offline. Resuming
    from before the first move, it gets exactly what her page that stayed connected got:
    the South request and its removal, the North request (let in by the first move) and
    its removal, then the East and general requests. A replay that decided what follows a
    move with the keys from before it would miss the North request."""
    kind, world = transport
    customer = await world.make("cara", "customer")
    rita = await world.make("rita", "mechanic", workshop="South")
    nora = await world.make("nora", "mechanic", workshop="North")
    erin = await world.make("erin", "mechanic", workshop="East")
    move = "update public.mechanics set workshop_id = %s where user_id = %s"
    cursor = await log_head(world.db_url)
    async with httpx.AsyncClient(timeout=10) as http, subscribed(kind, world, rita) as live:
        await world.queued(http, customer, rita.workshop_id)
        await sql(world, move, nora.workshop_id, rita.id)
        await world.queued(http, customer, nora.workshop_id)
        await sql(world, move, erin.workshop_id, rita.id)
        await world.queued(http, customer, erin.workshop_id)
        await world.queued(http, customer)
        seen_live = changes_of(await fence(world, live))
    assert [t for t, _ in seen_live] == ["UPDATE", "DELETE", "UPDATE", "DELETE", "UPDATE", "UPDATE"]

    async with subscribed(kind, world, rita, resume_from=cursor) as resumed:
        seen_resumed: list[dict[str, Any]] = []
        while not seen_resumed or seen_resumed[-1]["table"] != "feature_flags":
            seen_resumed += await resumed(1)
    assert changes_of(seen_resumed[:-1]) == seen_live


async def test_a_move_between_reading_the_keys_and_subscribing_is_applied(
    transport: tuple[str, LiveWorld],
) -> None:
    """Rita is moved in the instant after her fresh subscription read her keys, and the
    log reader routes the move before the subscription is registered. The join still
    succeeds: she gets the removal of the South request the move took away, then only
    what the North workshop may see. (The move is committed from inside the server's own
    read of the keys: the only way to hit that instant every time.)"""
    kind, world = transport
    customer = await world.make("cara", "customer")
    rita = await world.make("rita", "mechanic", workshop="South")
    nora = await world.make("nora", "mechanic", workshop="North")
    hub = world.server.app.state.realtime
    read_keys = hub._keys_and_head

    async def keys_then_move(user_id: Any) -> Any:
        found = await read_keys(user_id)
        async with await psycopg.AsyncConnection.connect(world.db_url, autocommit=True) as conn:
            await conn.execute(
                "update public.mechanics set workshop_id = %s where user_id = %s",
                (nora.workshop_id, rita.id),
            )
            cur = await conn.execute("select last_id from realtime.stream where id = 1")
            row = await cur.fetchone()
        assert row is not None
        while hub.reader.position < row[0]:
            await asyncio.sleep(0.01)
        return found

    async with httpx.AsyncClient(timeout=10) as http:
        south = (await world.queued(http, customer, rita.workshop_id))["assignment"]["id"]
        hub._keys_and_head = keys_then_move
        try:
            async with subscribed(kind, world, rita) as rows:
                hub._keys_and_head = read_keys
                assert removal_ids(await rows(1)) == [south]
                await world.queued(http, customer, rita.workshop_id)
                north = (await world.queued(http, customer, nora.workshop_id))["assignment"]
                assert changes_of(await fence(world, rows)) == [("UPDATE", north["id"])]
        finally:
            hub._keys_and_head = read_keys
