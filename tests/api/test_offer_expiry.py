"""An offer past its expiry is expired even when the expiry task has not run (migration
0005): accept, decline, offer and the queue read treat it as back in the queue."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from autodispatch.app import create_app
from conftest import World, make_settings


@pytest.fixture
async def idle_world(db_url: str, tmp_path: Path) -> AsyncIterator[World]:
    """A marketplace whose expiry task runs once at start, then not for an hour."""
    app = create_app(make_settings(tmp_path, expiry_interval_seconds=3600), db_url)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        w = World(app, client, *([None] * 9))  # type: ignore[arg-type]
        await w.populate()
        yield w


async def sql(world: World, query: str, *params: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        cur = await conn.execute(query, params)
        rows = await cur.fetchall() if cur.description else []
        await conn.commit()
        return rows


async def lapsed_offer(world: World) -> tuple[str, str]:
    """A queued request offered to ``world.mechanic``, its expiry moved a minute into the
    past behind the (idle) expiry task's back; returns (session id, assignment id)."""
    pair = await world.queued()
    sid, aid = pair["session"]["id"], pair["assignment"]["id"]
    r = await world.client.post(
        f"/api/assignments/{aid}/offer",
        json={"mechanic_id": str(world.mechanic.mechanic_id), "ttl_seconds": 60},
        headers=world.admin.headers,
    )
    assert r.status_code == 200 and r.json()["assignment"]["status"] == "offered"
    await sql(
        world,
        "update session_assignments set offer_expires_at = now() - interval '1 minute'"
        " where id = %s",
        aid,
    )
    return sid, aid


async def assignment_moves(world: World, sid: str) -> list[tuple[Any, ...]]:
    return await sql(
        world,
        "select from_status, to_status, reason from lifecycle_audit"
        " where session_id = %s and entity = 'assignment' order by id",
        sid,
    )


async def test_the_queue_shows_a_lapsed_offer_as_queued(idle_world: World) -> None:
    """The mechanic an offer was made to no longer sees it as an offer once it expired,
    but as the queued request it is again."""
    world = idle_world
    _, aid = await lapsed_offer(world)
    r = await world.client.get("/api/mechanic/queue", headers=world.mechanic.headers)
    (item,) = [item for item in r.json()["items"] if item["id"] == aid]
    assert item["status"] == "queued"
    assert item["offered_to"] is None and item["offer_expires_at"] is None
    r = await world.client.get("/api/mechanic/queue", headers=world.admin.headers)
    (item,) = [item for item in r.json()["items"] if item["id"] == aid]
    assert item["status"] == "queued" and item["offered_to"] is None
    # The row itself waits for the expiry task (nothing was written by reading).
    assert await sql(world, "select status from session_assignments where id = %s", aid) == [
        ("offered",)
    ]


async def test_accepting_a_lapsed_offer_accepts_the_queued_request(idle_world: World) -> None:
    """Its mechanic may still take it, as a queued request: the offer is recorded as
    expired first (as the expiry task writes it), then the acceptance."""
    world = idle_world
    sid, aid = await lapsed_offer(world)
    r = await world.client.post(f"/api/assignments/{aid}/accept", headers=world.mechanic.headers)
    assert r.status_code == 200, r.text
    assert r.json()["assignment"]["status"] == "accepted"
    assert r.json()["assignment"]["offered_to"] is None
    assert await assignment_moves(world, sid) == [
        (None, "pending_waiver", "customer requested a session"),
        ("pending_waiver", "queued", "customer signed the waiver"),
        ("queued", "offered", f"admin offered to mechanic {world.mechanic.mechanic_id} for 60 s"),
        ("offered", "queued", "offer expired"),
        ("queued", "accepted", "mechanic accepted"),
    ]


async def test_a_lapsed_offer_may_be_taken_by_any_mechanic_of_its_pool(
    idle_world: World,
) -> None:
    """Back in the queue means back in everyone's: another mechanic's accept is no longer
    refused as `offered_to_another`, and exactly one of the two wins."""
    world = idle_world
    _, aid = await lapsed_offer(world)
    r = await world.client.post(
        f"/api/assignments/{aid}/accept", headers=world.other_mechanic.headers
    )
    assert r.status_code == 200, r.text
    assert r.json()["assignment"]["mechanic_name"] == "Max Mechanic"
    r = await world.client.post(f"/api/assignments/{aid}/accept", headers=world.mechanic.headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_taken"


async def test_declining_a_lapsed_offer_is_refused_and_changes_nothing(
    idle_world: World,
) -> None:
    """There is no offer left to decline: 409 with the code the call gets once the expiry
    task has run, a message that says it expired, and no new audit row."""
    world = idle_world
    sid, aid = await lapsed_offer(world)
    before = await assignment_moves(world, sid)
    r = await world.client.post(f"/api/assignments/{aid}/decline", headers=world.mechanic.headers)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "not_offered_to_you"
    assert "expired" in r.json()["error"]["message"]
    assert await assignment_moves(world, sid) == before


async def test_an_admin_may_offer_a_lapsed_offer_again(idle_world: World) -> None:
    """A lapsed offer is a queued request: it may be offered to another mechanic."""
    world = idle_world
    sid, aid = await lapsed_offer(world)
    r = await world.client.post(
        f"/api/assignments/{aid}/offer",
        json={"mechanic_id": str(world.other_mechanic.mechanic_id), "ttl_seconds": 60},
        headers=world.admin.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["assignment"]["status"] == "offered"
    assert r.json()["assignment"]["offered_to"] == str(world.other_mechanic.mechanic_id)
    assert [move[:2] for move in (await assignment_moves(world, sid))[-2:]] == [
        ("offered", "queued"),
        ("queued", "offered"),
    ]


async def test_an_open_offer_is_unchanged(idle_world: World) -> None:
    """Before its expiry an offer is still only its mechanic's (the rule did not widen)."""
    world = idle_world
    aid = (await world.queued())["assignment"]["id"]
    r = await world.client.post(
        f"/api/assignments/{aid}/offer",
        json={"mechanic_id": str(world.mechanic.mechanic_id), "ttl_seconds": 60},
        headers=world.admin.headers,
    )
    assert r.status_code == 200
    r = await world.client.get("/api/mechanic/queue", headers=world.mechanic.headers)
    (item,) = [item for item in r.json()["items"] if item["id"] == aid]
    assert item["status"] == "offered"
    assert item["offered_to"] == str(world.mechanic.mechanic_id)
    r = await world.client.post(
        f"/api/assignments/{aid}/accept", headers=world.other_mechanic.headers
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "offered_to_another"
