"""Random sequences of API actions against PostgreSQL; sessions and assignments always agree.

A hypothesis state machine drives customers, mechanics and an admin through the real
HTTP API on a real database. After every step it checks DESIGN invariant 5 over the
whole database, that no request ever got a 5xx, and that each mechanic's queue holds
exactly the open requests that mechanic may take.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import psycopg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from autodispatch.app import create_app
from autodispatch.domain.lifecycle import CONSISTENT_PAIRS
from conftest import World, make_settings


def test_random_api_sequences_keep_sessions_and_assignments_in_step(
    db_url: str, tmp_path: Path
) -> None:
    """Sessions and assignments never disagree, whatever sequence of API calls is made."""
    loop = asyncio.new_event_loop()
    app = create_app(make_settings(tmp_path, expiry_interval_seconds=3600), db_url)
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    world = World(app, client, *([None] * 9))  # type: ignore[arg-type]

    loop.run_until_complete(world.populate())
    workshops = {
        None: None,
        "north": world.workshop_mechanic.workshop_id,
        "south": world.rival_workshop_mechanic.workshop_id,
    }
    customers = [world.customer, world.other_customer]
    mechanics = [
        world.mechanic,
        world.other_mechanic,
        world.workshop_mechanic,
        world.rival_workshop_mechanic,
    ]

    def run(coro: Any) -> Any:
        return loop.run_until_complete(coro)

    class Dispatch(RuleBasedStateMachine):
        sessions = Bundle("sessions")

        @initialize()
        def clean(self) -> None:
            self.responses: list[int] = []

        def call(self, method: str, url: str, who: Any, body: Any = None) -> httpx.Response:
            r = run(client.request(method, url, json=body, headers=who.headers))
            assert r.status_code < 500, r.text
            if r.status_code >= 400:
                assert r.json()["error"]["message"], r.text
            return r

        @rule(
            target=sessions,
            customer=st.sampled_from(customers),
            kind=st.sampled_from(["free", "paid"]),
            workshop=st.sampled_from(sorted(workshops, key=str)),
        )
        def request(self, customer: Any, kind: str, workshop: str | None) -> tuple[str, str, Any]:
            body: dict[str, Any] = {
                "type": kind,
                "intake": {
                    "name": "Pat Q",
                    "vehicle_year": 2012,
                    "vehicle_make": "Ford",
                    "vehicle_model": "Focus",
                    "concern": "Noise",
                },
            }
            if workshops[workshop]:
                body["workshop_id"] = str(workshops[workshop])
            r = self.call("POST", "/api/sessions", customer, body)
            assert r.status_code == 201
            assert r.json()["assignment"]["status"] == "pending_waiver"
            return r.json()["session"]["id"], r.json()["assignment"]["id"], customer

        @rule(s=sessions)
        def sign_waiver(self, s: tuple[str, str, Any]) -> None:
            self.call("POST", f"/api/sessions/{s[0]}/waiver", s[2])

        @rule(s=sessions)
        def pay(self, s: tuple[str, str, Any]) -> None:
            self.call("POST", f"/api/dev/sessions/{s[0]}/confirm-payment", s[2])

        @rule(s=sessions, m=st.sampled_from(mechanics))
        def accept(self, s: tuple[str, str, Any], m: Any) -> None:
            r = self.call("POST", f"/api/assignments/{s[1]}/accept", m)
            if r.status_code == 200:
                assert r.json()["assignment"]["mechanic_id"] == str(m.mechanic_id)

        @rule(s=sessions, m=st.sampled_from(mechanics))
        def decline(self, s: tuple[str, str, Any], m: Any) -> None:
            self.call("POST", f"/api/assignments/{s[1]}/decline", m)

        @rule(s=sessions, m=st.sampled_from(mechanics))
        def offer(self, s: tuple[str, str, Any], m: Any) -> None:
            self.call(
                "POST",
                f"/api/assignments/{s[1]}/offer",
                world.admin,
                {"mechanic_id": str(m.mechanic_id), "ttl_seconds": 60},
            )

        @rule()
        def offers_expire(self) -> None:
            async def go() -> None:
                async with await psycopg.AsyncConnection.connect(db_url) as conn:
                    await conn.execute(
                        "update session_assignments set offer_expires_at = now() - interval '1 s'"
                        " where status = 'offered'"
                    )
                    await conn.execute("select * from api.expire_due(interval '1 hour')")

            run(go())

        @rule(s=sessions, who=st.sampled_from(["customer", *range(len(mechanics))]))
        def start(self, s: tuple[str, str, Any], who: Any) -> None:
            self.call(
                "POST", f"/api/sessions/{s[0]}/start", s[2] if who == "customer" else mechanics[who]
            )

        @rule(
            s=sessions,
            who=st.sampled_from(["customer", "admin", *range(len(mechanics))]),
            action=st.sampled_from(["end", "cancel"]),
        )
        def finish(self, s: tuple[str, str, Any], who: Any, action: str) -> None:
            actor = (
                {"customer": s[2], "admin": world.admin}.get(who)
                if isinstance(who, str)
                else (mechanics[who])
            )
            r = self.call("POST", f"/api/sessions/{s[0]}/{action}", actor)
            if r.status_code == 200:
                status = r.json()["session"]["status"]
                assert status in ("completed", "cancelled")
                if action == "cancel":
                    assert status == "cancelled"

        @invariant()
        def sessions_and_assignments_agree(self) -> None:
            async def pairs() -> list[tuple[str, str, str, Any, Any]]:
                async with await psycopg.AsyncConnection.connect(db_url) as conn:
                    cur = await conn.execute(
                        "select s.status, a.status, s.id::text, s.mechanic_id, a.mechanic_id"
                        " from sessions s left join session_assignments a on a.session_id = s.id"
                    )
                    return await cur.fetchall()

            for session_status, assignment_status, sid, s_mech, a_mech in run(pairs()):
                assert (session_status, assignment_status) in CONSISTENT_PAIRS, sid
                if session_status in ("waiting", "live"):
                    assert s_mech == a_mech is not None

        @invariant()
        def queues_hold_exactly_what_each_mechanic_may_take(self) -> None:
            async def open_rows() -> list[tuple[str, str, Any, Any]]:
                async with await psycopg.AsyncConnection.connect(db_url) as conn:
                    cur = await conn.execute(
                        "select id::text, status, workshop_id, offered_to from session_assignments"
                        " where status in ('queued', 'offered')"
                    )
                    return await cur.fetchall()

            rows = run(open_rows())
            for m in mechanics:
                expected = {
                    aid
                    for aid, status, workshop_id, offered_to in rows
                    if (status == "queued" and workshop_id in (None, m.workshop_id))
                    or (status == "offered" and offered_to == m.mechanic_id)
                }
                assert set(run(world.queue_ids(m))) == expected, m.email

    Dispatch.TestCase.settings = settings(
        max_examples=25,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    try:
        Dispatch.TestCase().runTest()
    finally:
        run(client.aclose())
        run(lifespan.__aexit__(None, None, None))
        loop.close()
