"""The router's decision equals row-level security, for random principals and transitions.

A hypothesis state machine makes random API moves. After each, for every event the
move wrote and every principal, the router's answer (the event's stored keys against
the principal's keys from ``auth.principal_keys_for``) must equal what PostgreSQL's RLS
says under that principal's claims: the new version is visible iff SELECT finds the row
now; the old version was visible iff SELECT found it before the move.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import psycopg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from autodispatch.app import create_app
from autodispatch.realtime.events import Event
from conftest import Account, World, make_settings

TABLES = ("sessions", "session_assignments", "feature_flags")


def test_router_and_rls_agree_on_every_event(db_url: str, tmp_path: Path) -> None:
    """For every event and principal: router delivers (or removes) iff RLS shows that version."""
    loop = asyncio.new_event_loop()
    app = create_app(make_settings(tmp_path, expiry_interval_seconds=3600), db_url)
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    world = World(app, client, *([None] * 9))  # type: ignore[arg-type]

    def run(coro: Any) -> Any:
        return loop.run_until_complete(coro)

    run(world.populate())
    principals: list[Account | None] = [
        world.customer,
        world.other_customer,
        world.mechanic,
        world.other_mechanic,
        world.workshop_mechanic,
        world.rival_workshop_mechanic,
        world.admin,
        None,
    ]
    mechanics = principals[2:6]
    workshops = [
        None,
        world.workshop_mechanic.workshop_id,
        world.rival_workshop_mechanic.workshop_id,
    ]
    conn = psycopg.connect(db_url, autocommit=True)

    def keys_of(who: Account | None) -> frozenset[str]:
        if who is None:
            return frozenset({"public"})
        row = conn.execute("select auth.principal_keys_for(%s)", (who.id,)).fetchone()
        assert row is not None
        return frozenset(row[0])

    keys = {id(p): keys_of(p) for p in principals}

    def visible_now(who: Account | None) -> set[tuple[str, str]]:
        claims = {"sub": str(who.id), "role": "authenticated"} if who else {"role": "anon"}
        with conn.transaction():
            conn.execute(
                "select set_config('role', %s, true), set_config('request.jwt.claims', %s, true)",
                ("authenticated" if who else "anon", json.dumps(claims)),
            )
            found: set[tuple[str, str]] = set()
            for table in TABLES:
                column = "key" if table == "feature_flags" else "id"
                for (row_id,) in conn.execute(f"select {column}::text from {table}").fetchall():
                    found.add((table, row_id))
            conn.execute("reset role")
        return found

    def head() -> int:
        row = conn.execute("select last_id from realtime.stream").fetchone()
        assert row is not None
        return int(row[0])

    class Agreement(RuleBasedStateMachine):
        sessions = Bundle("sessions")

        def __init__(self) -> None:
            super().__init__()
            self.position = head()
            self.before = {id(p): visible_now(p) for p in principals}

        def call(self, method: str, url: str, who: Account, body: Any = None) -> httpx.Response:
            r = run(client.request(method, url, json=body, headers=who.headers))
            assert r.status_code < 500, r.text
            return r

        @rule(
            target=sessions, customer=st.sampled_from([0, 1]), workshop=st.sampled_from([0, 1, 2])
        )
        def request(self, customer: int, workshop: int) -> tuple[str, str, Account]:
            who = principals[customer]
            assert who is not None
            body: dict[str, Any] = {
                "type": "free",
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
            r = self.call("POST", "/api/sessions", who, body)
            return r.json()["session"]["id"], r.json()["assignment"]["id"], who

        @rule(s=sessions)
        def waiver(self, s: tuple[str, str, Account]) -> None:
            self.call("POST", f"/api/sessions/{s[0]}/waiver", s[2])

        @rule(s=sessions, m=st.sampled_from(range(4)))
        def accept(self, s: tuple[str, str, Account], m: int) -> None:
            self.call("POST", f"/api/assignments/{s[1]}/accept", mechanics[m])

        @rule(s=sessions, m=st.sampled_from(range(4)))
        def offer(self, s: tuple[str, str, Account], m: int) -> None:
            target = mechanics[m]
            assert target is not None
            self.call(
                "POST",
                f"/api/assignments/{s[1]}/offer",
                world.admin,
                {"mechanic_id": str(target.mechanic_id), "ttl_seconds": 60},
            )

        @rule(s=sessions, m=st.sampled_from(range(4)))
        def decline(self, s: tuple[str, str, Account], m: int) -> None:
            self.call("POST", f"/api/assignments/{s[1]}/decline", mechanics[m])

        @rule(s=sessions, m=st.sampled_from(range(4)))
        def start(self, s: tuple[str, str, Account], m: int) -> None:
            self.call("POST", f"/api/sessions/{s[0]}/start", mechanics[m])

        @rule(s=sessions, action=st.sampled_from(["end", "cancel"]))
        def finish(self, s: tuple[str, str, Account], action: str) -> None:
            self.call("POST", f"/api/sessions/{s[0]}/{action}", s[2])

        @rule(enabled=st.booleans())
        def flag(self, enabled: bool) -> None:
            self.call(
                "PATCH", "/api/feature-flags/mech_audio_alerts", world.admin, {"enabled": enabled}
            )

        @invariant()
        def router_equals_rls(self) -> None:
            rows = conn.execute(
                "select id, at, schema_name, table_name, type, row_id, record, old_record,"
                " new_keys, old_keys from realtime.events where id > %s order by id",
                (self.position,),
            ).fetchall()
            names = ["id", "at", "schema_name", "table_name", "type", "row_id", "record",
                     "old_record", "new_keys", "old_keys"]  # fmt: skip
            events = [Event.from_row(dict(zip(names, r, strict=True))) for r in rows]
            after = {id(p): visible_now(p) for p in principals}
            first: dict[tuple[str, str], Event] = {}
            last: dict[tuple[str, str], Event] = {}
            for e in events:
                first.setdefault((e.table, e.row_id), e)
                last[(e.table, e.row_id)] = e
            for p in principals:
                k = keys[id(p)]
                for row, e in last.items():
                    router_new = e.record is not None and not e.new_keys.isdisjoint(k)
                    assert router_new == (row in after[id(p)]), (row, e.type, sorted(k))
                for row, e in first.items():
                    router_old = e.old_record is not None and not e.old_keys.isdisjoint(k)
                    assert router_old == (row in self.before[id(p)]), (row, e.type, sorted(k))
            self.before = after
            if events:
                self.position = events[-1].id

    Agreement.TestCase.settings = settings(
        max_examples=15,
        stateful_step_count=15,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    try:
        Agreement.TestCase().runTest()
    finally:
        conn.close()
        run(client.aclose())
        run(lifespan.__aexit__(None, None, None))
        loop.close()
