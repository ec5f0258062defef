"""Row-level security, checked through SQL under each principal's claims (not through routes)."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from conftest import Account, World


class AsPrincipal:
    """Run SELECTs as the `authenticated` (or `anon`) role with a principal's claims."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url

    async def rows(self, who: Account | None, query: str) -> list[tuple[Any, ...]]:
        claims: dict[str, Any] = (
            {"sub": str(who.id), "role": "authenticated"} if who else {"role": "anon"}
        )
        async with (
            await psycopg.AsyncConnection.connect(self.db_url) as conn,
            conn.transaction(),
        ):
            await conn.execute(
                "select set_config('role', %s, true), set_config('request.jwt.claims', %s, true)",
                ("authenticated" if who else "anon", json.dumps(claims)),
            )
            cur = await conn.execute(query)
            return await cur.fetchall()

    async def ids(self, who: Account | None, table: str, where: str = "true") -> set[str]:
        return {r[0] for r in await self.rows(who, f"select id::text from {table} where {where}")}


@pytest.fixture
def sql(world: World) -> AsPrincipal:
    return AsPrincipal(world.app.state.services.db.url)


async def test_customer_sees_only_own_rows(world: World, sql: AsPrincipal) -> None:
    """A customer reads their own sessions, intakes, assignments, waivers and payments only."""
    mine = await world.queued(world.customer)
    theirs = await world.queued(world.other_customer)
    paid = await world.request(world.customer, type="paid")
    for table, key in (("sessions", "session"), ("session_assignments", "assignment")):
        seen = await sql.ids(world.customer, table)
        assert mine[key]["id"] in seen and paid[key]["id"] in seen
        assert theirs[key]["id"] not in seen
    intakes = await sql.ids(world.customer, "intakes")
    assert mine["session"]["intake"]["id"] in intakes
    assert theirs["session"]["intake"]["id"] not in intakes
    assert len(await sql.ids(world.customer, "waivers")) == 1
    assert len(await sql.ids(world.other_customer, "waivers")) == 1
    assert len(await sql.ids(world.customer, "payments")) == 1
    assert await sql.ids(world.other_customer, "payments") == set()
    assert await sql.ids(world.customer, "profiles") == {str(world.customer.id)}


async def test_mechanics_see_the_pool_they_may_take(world: World, sql: AsPrincipal) -> None:
    """Independent mechanics see general requests; workshop mechanics also their workshop's."""
    general = await world.queued()
    north = await world.queued(workshop_id=world.workshop_id)
    south = await world.queued(workshop_id=world.rival_workshop_id)
    unsigned = await world.request()
    ids = {
        name: pair["assignment"]["id"]
        for name, pair in (
            ("general", general),
            ("north", north),
            ("south", south),
            ("unsigned", unsigned),
        )
    }
    expected = {
        world.mechanic.email: {"general"},
        world.other_mechanic.email: {"general"},
        world.workshop_mechanic.email: {"general", "north"},
        world.rival_workshop_mechanic.email: {"general", "south"},
    }
    for account in (
        world.mechanic,
        world.other_mechanic,
        world.workshop_mechanic,
        world.rival_workshop_mechanic,
    ):
        seen = await sql.ids(account, "session_assignments")
        assert seen == {ids[n] for n in expected[account.email]}, account.email
        sessions = await sql.ids(account, "sessions")
        want_sessions = {
            pair["session"]["id"]
            for n, pair in (("general", general), ("north", north), ("south", south))
            if n in expected[account.email]
        }
        assert sessions == want_sessions
        intakes = await sql.ids(account, "intakes")
        assert len(intakes) == len(want_sessions)
        # Mechanics never read customers' waivers, payments or profiles.
        assert await sql.ids(account, "waivers") == set()
        assert await sql.ids(account, "profiles") == {str(account.id)}


async def test_offer_is_visible_only_to_its_target(world: World, sql: AsPrincipal) -> None:
    """An offered request leaves the pool: only the mechanic it is offered to sees it."""
    pair = await world.queued()
    aid = pair["assignment"]["id"]
    r = await world.client.post(
        f"/api/assignments/{aid}/offer",
        json={"mechanic_id": str(world.mechanic.mechanic_id), "ttl_seconds": 60},
        headers=world.admin.headers,
    )
    assert r.status_code == 200, r.text
    assert aid in await sql.ids(world.mechanic, "session_assignments")
    assert aid not in await sql.ids(world.other_mechanic, "session_assignments")
    assert aid not in await sql.ids(world.workshop_mechanic, "session_assignments")
    assert aid in await sql.ids(world.customer, "session_assignments")


async def test_accepted_request_is_visible_to_the_winner_only(
    world: World, sql: AsPrincipal
) -> None:
    """After an accept, other mechanics no longer see the request, its session or intake."""
    pair = await world.queued()
    aid, sid = pair["assignment"]["id"], pair["session"]["id"]
    r = await world.client.post(f"/api/assignments/{aid}/accept", headers=world.mechanic.headers)
    assert r.status_code == 200, r.text
    assert aid in await sql.ids(world.mechanic, "session_assignments")
    assert sid in await sql.ids(world.mechanic, "sessions")
    for other in (world.other_mechanic, world.workshop_mechanic):
        assert aid not in await sql.ids(other, "session_assignments")
        assert sid not in await sql.ids(other, "sessions")
        assert await sql.ids(other, "intakes") == set()
    # The winner keeps seeing it after it ends (it is theirs), nobody else does.
    await world.client.post(f"/api/sessions/{sid}/start", headers=world.mechanic.headers)
    await world.client.post(f"/api/sessions/{sid}/end", headers=world.customer.headers)
    assert sid in await sql.ids(world.mechanic, "sessions")
    assert sid not in await sql.ids(world.other_mechanic, "sessions")


async def test_admin_sees_everything(world: World, sql: AsPrincipal) -> None:
    """An admin reads every row of every table, audit included."""
    await world.queued()
    await world.request(world.other_customer, type="paid")
    for table in ("sessions", "session_assignments", "intakes", "waivers", "payments", "profiles"):
        async with await psycopg.AsyncConnection.connect(sql.db_url) as conn:
            cur = await conn.execute(f"select count(*) from {table}")
            row = await cur.fetchone()
            assert row is not None
            total = row[0]
        assert len(await sql.ids(world.admin, table)) == total > 0, table
    assert len(await sql.ids(world.admin, "lifecycle_audit")) > 0
    assert await sql.ids(world.customer, "lifecycle_audit") == set()


async def test_flags_are_readable_by_everyone(world: World, sql: AsPrincipal) -> None:
    """Every feature flag, enabled or not, is readable by anonymous and signed-in callers."""
    r = await world.client.patch(
        "/api/feature-flags/mech_audio_alerts", json={"enabled": False}, headers=world.admin.headers
    )
    assert r.status_code == 200, r.text
    for who in (None, world.customer, world.mechanic, world.admin):
        rows = dict(await sql.rows(who, "select key, enabled from feature_flags"))
        assert len(rows) == 4 and rows["mech_audio_alerts"] is False


async def test_anonymous_sees_no_dispatch_rows(world: World, sql: AsPrincipal) -> None:
    """Without a user, no session, assignment, intake or profile is readable."""
    await world.queued()
    for table in ("sessions", "session_assignments", "intakes", "profiles", "waivers"):
        assert await sql.ids(None, table) == set(), table


async def test_roles_cannot_write_tables_directly(world: World) -> None:
    """The API roles have no INSERT/UPDATE/DELETE: every change goes through api.* functions."""
    pair = await world.queued()
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        for statement in (
            "update session_assignments set status = 'accepted'",
            "delete from sessions",
            "insert into feature_flags (key) values ('sneaky')",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                async with conn.transaction():
                    await conn.execute(
                        "select set_config('role', 'authenticated', true),"
                        " set_config('request.jwt.claims', %s, true)",
                        (json.dumps({"sub": str(world.mechanic.id), "role": "authenticated"}),),
                    )
                    await conn.execute(statement)
    r = await world.client.get(
        f"/api/sessions/{pair['session']['id']}", headers=world.customer.headers
    )
    assert r.json()["assignment"]["status"] == "queued"
