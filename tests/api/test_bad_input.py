"""Bad input gets a clear 4xx JSON error and changes nothing (DESIGN invariant 6)."""

from __future__ import annotations

import time
from typing import Any

import jwt
import psycopg
import pytest

from conftest import SECRET, World

TABLES = (
    "auth.users",
    "public.profiles",
    "public.intakes",
    "public.sessions",
    "public.session_assignments",
    "public.waivers",
    "public.payments",
    "public.feature_flags",
    "public.lifecycle_audit",
)


async def snapshot(world: World) -> dict[str, list[str]]:
    """Every row of every dispatch table, as text, in a stable order."""
    out: dict[str, list[str]] = {}
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        for table in TABLES:
            cur = await conn.execute(f"select t::text from {table} t order by 1")
            out[table] = [r[0] for r in await cur.fetchall()]
    return out


def intake(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "Dana Driver",
        "vehicle_year": 2016,
        "vehicle_make": "Toyota",
        "vehicle_model": "Corolla",
        "concern": "Grinding noise",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


NEXT_YEAR = time.gmtime().tm_year + 1

# (description, body, expected status, expected code or None)
CREATE_CASES: list[tuple[str, Any, int, str | None]] = [
    ("unknown field", {"type": "free", "intake": intake(), "colour": "red"}, 422, "invalid_input"),
    ("unknown intake field", {"type": "free", "intake": intake(vin="x")}, 422, "invalid_input"),
    ("missing intake", {"type": "free"}, 422, "invalid_input"),
    ("missing concern", {"type": "free", "intake": intake(concern=None)}, 422, "invalid_input"),
    ("wrong type", {"type": "premium", "intake": intake()}, 422, "invalid_input"),
    ("year as text", {"type": "free", "intake": intake(vehicle_year="new")}, 422, "invalid_input"),
    ("year too old", {"type": "free", "intake": intake(vehicle_year=1899)}, 422, "invalid_input"),
    (
        "year past next year",
        {"type": "free", "intake": intake(vehicle_year=NEXT_YEAR + 1)},
        422,
        "invalid_input",
    ),
    ("oversized concern", {"type": "free", "intake": intake(concern="x" * 2001)}, 422, None),
    ("blank name", {"type": "free", "intake": intake(name="   ")}, 422, "invalid_input"),
    (
        "unknown workshop",
        {"type": "free", "intake": intake(), "workshop_id": "00000000-0000-0000-0000-000000000001"},
        422,
        "unknown_workshop",
    ),
    ("workshop not a uuid", {"type": "free", "intake": intake(), "workshop_id": "x"}, 422, None),
    ("body is a list", [1, 2], 422, "invalid_input"),
]


@pytest.mark.parametrize(
    ("body", "status", "code"), [c[1:] for c in CREATE_CASES], ids=[c[0] for c in CREATE_CASES]
)
async def test_bad_session_request_is_refused_and_changes_nothing(
    world: World, body: Any, status: int, code: str | None
) -> None:
    """Each malformed session request gets its 4xx error with a message and no rows change."""
    before = await snapshot(world)
    r = await world.client.post("/api/sessions", json=body, headers=world.customer.headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and (code is None or error["code"] == code)
    assert await snapshot(world) == before


async def test_year_bound_is_next_year_inclusive(world: World) -> None:
    """Next year's model is accepted (dealers sell them); the message names the bounds."""
    r = await world.client.post(
        "/api/sessions",
        json={"type": "free", "intake": intake(vehicle_year=NEXT_YEAR + 1)},
        headers=world.customer.headers,
    )
    assert f"1900 to {NEXT_YEAR}" in r.json()["error"]["message"]
    r = await world.client.post(
        "/api/sessions",
        json={"type": "free", "intake": intake(vehicle_year=NEXT_YEAR)},
        headers=world.customer.headers,
    )
    assert r.status_code == 201


async def test_malformed_json_is_a_400(world: World) -> None:
    """A body that is not JSON gets 400 malformed_json."""
    before = await snapshot(world)
    r = await world.client.post(
        "/api/sessions",
        content=b'{"type": "free", ',
        headers={**world.customer.headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"
    assert await snapshot(world) == before


def forged(claims: dict[str, Any], secret: str = "another-secret-" + "y" * 40) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


async def test_bad_tokens_are_refused_with_401(world: World) -> None:
    """A forged, expired, malformed or role-less token gets 401 and changes nothing."""
    now = int(time.time())
    sub = str(world.customer.id)
    tokens = {
        "forged": forged({"sub": sub, "role": "authenticated", "exp": now + 600}),
        "expired": forged({"sub": sub, "role": "authenticated", "exp": now - 10}, SECRET),
        "no role": forged({"sub": sub, "exp": now + 600}, SECRET),
        "odd role": forged({"sub": sub, "role": "service_role", "exp": now + 600}, SECRET),
        "garbage": "not-a-jwt",
    }
    before = await snapshot(world)
    for name, token in tokens.items():
        r = await world.client.post(
            "/api/sessions",
            json={"type": "free", "intake": intake()},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 401, (name, r.text)
        assert r.json()["error"]["code"] in ("invalid_token", "token_expired"), name
    r = await world.client.post("/api/sessions", json={"type": "free", "intake": intake()})
    assert r.status_code == 401 and r.json()["error"]["code"] == "not_authenticated"
    r = await world.client.get("/api/mechanic/queue", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    assert await snapshot(world) == before


async def test_wrong_role_is_a_403(world: World) -> None:
    """Mechanics cannot request sessions, customers cannot accept or change flags or offer."""
    pair = await world.queued()
    aid = pair["assignment"]["id"]
    before = await snapshot(world)
    cases = [
        ("POST", "/api/sessions", world.mechanic, {"type": "free", "intake": intake()}),
        ("POST", f"/api/assignments/{aid}/accept", world.customer, None),
        ("PATCH", "/api/feature-flags/mech_audio_alerts", world.mechanic, {"enabled": False}),
        (
            "POST",
            f"/api/assignments/{aid}/offer",
            world.mechanic,
            {"mechanic_id": str(world.mechanic.mechanic_id)},
        ),
        ("GET", "/api/mechanic/queue", world.customer, None),
        ("GET", "/api/mechanics", world.customer, None),
    ]
    for method, url, who, body in cases:
        r = await world.client.request(method, url, json=body, headers=who.headers)
        assert r.status_code == 403, (url, r.text)
        assert r.json()["error"]["message"]
    assert await snapshot(world) == before


async def test_actions_in_the_wrong_state_are_409s(world: World) -> None:
    """Start while pending, a second waiver, accept unsigned: 409 (or 404), no change."""
    unsigned = await world.request()
    queued = await world.queued()
    before = await snapshot(world)
    cases = [
        (f"/api/sessions/{queued['session']['id']}/start", world.customer, "invalid_state"),
        (
            f"/api/sessions/{queued['session']['id']}/waiver",
            world.customer,
            "waiver_already_signed",
        ),
        (f"/api/assignments/{unsigned['assignment']['id']}/accept", world.mechanic, None),
        (f"/api/assignments/{queued['assignment']['id']}/decline", world.mechanic, None),
    ]
    for url, who, code in cases:
        r = await world.client.post(url, headers=who.headers)
        assert r.status_code in (404, 409), (url, r.text)
        assert code is None or r.json()["error"]["code"] == code, r.text
    assert await snapshot(world) == before


async def test_unknown_things_are_404s(world: World) -> None:
    """Unknown sessions, assignments, flags and routes get 404 with a message; bad ids 422."""
    missing = "00000000-0000-0000-0000-00000000abcd"
    r = await world.client.get(f"/api/sessions/{missing}", headers=world.customer.headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    r = await world.client.get(f"/api/sessions/{missing}", headers=world.other_customer.headers)
    assert r.status_code == 404
    r = await world.client.post(
        f"/api/assignments/{missing}/accept", headers=world.mechanic.headers
    )
    assert r.status_code == 404
    r = await world.client.patch(
        "/api/feature-flags/no_such_flag", json={"enabled": True}, headers=world.admin.headers
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_flag"
    r = await world.client.get("/api/sessions/not-a-uuid", headers=world.customer.headers)
    assert r.status_code == 422
    r = await world.client.get("/api/nothing-here")
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]


async def test_another_customers_session_is_invisible(world: World) -> None:
    """A customer cannot read, sign, start, end or cancel another customer's session."""
    pair = await world.request()
    sid = pair["session"]["id"]
    before = await snapshot(world)
    for path in ("", "/waiver", "/start", "/end", "/cancel"):
        method = "GET" if path == "" else "POST"
        r = await world.client.request(
            method, f"/api/sessions/{sid}{path}", headers=world.other_customer.headers
        )
        assert r.status_code == 404, (path, r.text)
    assert await snapshot(world) == before
