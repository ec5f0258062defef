"""Alert receipts: about an event the mechanic could see, validated, stored once per event,
counted in /metrics, summed up for admins."""

from __future__ import annotations

import json
import statistics
from typing import Any

import psycopg
import pytest
from page_helpers import metric as read_metric

from conftest import Account, World, number_committed


async def metric(world: World, name: str, **labels: str) -> float:
    return await read_metric(world.client, name, **labels)


TIERS = ("toast", "sound", "notification", "title", "favicon")


def receipt(event_id: int | None = 1, **tiers: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "tiers": tiers or {t: {"status": "shown"} for t in TIERS},
        "commit_to_shown_ms": 120.0,
    }
    if event_id is not None:
        body["event_id"] = event_id
    return body


async def events(world: World, assignment_id: str) -> dict[str, int]:
    """The assignment's events: status -> the latest event id bringing it there."""
    await number_committed(world.app.state.services.db.url)
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        cur = await conn.execute(
            "select record ->> 'status', max(id) from realtime.events"
            " where table_name = 'session_assignments' and row_id = %s and id is not null"
            " group by 1",
            (assignment_id,),
        )
        return {status: int(event_id) for status, event_id in await cur.fetchall()}


async def alerted(world: World, **kwargs: Any) -> tuple[str, int]:
    """A queued request: its assignment id and the event that alerted mechanics."""
    pair = await world.queued(**kwargs)
    aid = pair["assignment"]["id"]
    return aid, (await events(world, aid))["queued"]


async def post(world: World, who: Account, body: Any) -> Any:
    return await world.client.post("/api/alert-receipts", json=body, headers=who.headers)


async def stored(world: World) -> int:
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        cur = await conn.execute("select count(*) from alert_receipts")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_a_receipt_is_stored_once_and_counted_once(world: World) -> None:
    """A mechanic's receipt is 201 with what was stored; the same event again is 200 with the
    first receipt, and /metrics counts the alert once per tier and status."""
    aid, event_id = await alerted(world)
    body = {
        "assignment_id": aid,
        "event_id": event_id,
        "tiers": {
            "toast": {"status": "shown"},
            "sound": {"status": "failed", "error": "NotAllowedError: play() failed"},
            "notification": {"status": "disabled"},
            "title": {"status": "shown"},
            "favicon": {"status": "unsupported"},
        },
        "commit_to_shown_ms": 350.5,
    }
    r = await post(world, world.mechanic, body)
    assert r.status_code == 201, r.text
    first = r.json()["receipt"]
    assert first["mechanic_user_id"] == str(world.mechanic.id)
    assert first["assignment_id"] == aid
    assert (first["event_id"], first["commit_to_shown_ms"]) == (event_id, 350.5)
    assert first["tiers"]["sound"] == {
        "status": "failed",
        "error": "NotAllowedError: play() failed",
    }
    assert first["tiers"]["toast"] == {"status": "shown"}

    r = await post(world, world.mechanic, {**body, "commit_to_shown_ms": 9999})
    assert r.status_code == 200
    assert r.json()["receipt"] == first
    assert await stored(world) == 1
    assert await metric(world, "autodispatch_alert_tiers_total", tier="sound", status="failed") == 1
    assert await metric(world, "autodispatch_alert_tiers_total", tier="toast", status="shown") == 1
    assert (
        await metric(world, "autodispatch_alert_tiers_total", tier="favicon", status="unsupported")
        == 1
    )
    assert await metric(world, "autodispatch_alert_commit_to_shown_seconds_count") == 1
    assert await metric(world, "autodispatch_alert_commit_to_shown_seconds_sum") == pytest.approx(
        0.3505
    )
    assert await metric(world, "autodispatch_alert_commit_to_shown_seconds_bucket", le="0.5") == 1

    # Another mechanic's receipt for the same event is theirs; the same alert reported by
    # its assignment only (a page that alerted from a queue read) is the same receipt.
    assert (await post(world, world.other_mechanic, body)).status_code == 201
    by_assignment = {"assignment_id": aid, "tiers": {"toast": {"status": "shown"}}}
    r = await post(world, world.mechanic, by_assignment)
    assert r.status_code == 200 and r.json()["receipt"] == first
    assert await stored(world) == 2
    assert await metric(world, "autodispatch_alert_tiers_total", tier="toast", status="shown") == 2


@pytest.mark.parametrize(
    "body",
    [
        receipt(vibrate={"status": "shown"}),
        receipt(toast={"status": "ok"}),
        receipt(toast={"status": "shown", "extra": 1}),
        receipt(toast={}),
        receipt(toast="shown"),
        {"tiers": {}},
        {"tiers": {"toast": {"status": "shown"}}, "commit_to_shown_ms": -1, "event_id": 1},
        {"tiers": {"toast": {"status": "shown"}}, "event_id": 0},
        {"tiers": {"toast": {"status": "shown"}}, "event_id": None},
        {"tiers": {"toast": {"status": "shown"}}},
        {"tiers": {"toast": {"status": "shown"}}, "assignment_id": "nope"},
        {"tiers": {"toast": {"status": "failed", "error": "x" * 501}}, "event_id": 1},
        {"tiers": {"toast": {"status": "shown"}}, "page": "mechanic", "event_id": 1},
        {"commit_to_shown_ms": 5, "event_id": 1},
    ],
    ids=lambda b: json.dumps(b)[:60],
)
async def test_bad_receipts_are_refused_and_change_nothing(world: World, body: Any) -> None:
    """An unknown tier or status, a malformed field, or an unknown field is 422; nothing is
    stored or counted."""
    r = await post(world, world.mechanic, body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_input"
    assert await stored(world) == 0
    assert "autodispatch_alert_tiers_total{" not in (await world.client.get("/metrics")).text


async def test_receipts_come_from_mechanics_about_real_requests(world: World) -> None:
    """Customers and admins get 403, anonymous callers 401; a receipt about an event the
    mechanic could not see is 404, the same answer as for one that does not exist: an
    unknown event or assignment, another workshop's request, an event of another table,
    an event of another assignment than the one named."""
    _, event_id = await alerted(world)
    for who in (world.customer, world.admin):
        r = await post(world, who, receipt(event_id))
        assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_role"
    r = await world.client.post("/api/alert-receipts", json=receipt(event_id))
    assert r.status_code == 401

    north, north_event = await alerted(world, workshop_id=world.workshop_id)
    other, _ = await alerted(world)
    await number_committed(world.app.state.services.db.url)
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        cur = await conn.execute(
            "select max(id) from realtime.events where table_name = 'sessions'"
            " and 'pool:general' = any(new_keys)"
        )
        row = await cur.fetchone()
        assert row is not None
        session_event = int(row[0])  # a session's event the mechanic could see
        cur = await conn.execute("select max(id) + 1000 from realtime.events")
        row = await cur.fetchone()
        assert row is not None
        unknown = int(row[0])
    refused = [
        receipt(unknown),
        {**receipt(None), "assignment_id": "00000000-0000-0000-0000-000000000001"},
        receipt(north_event),
        {**receipt(None), "assignment_id": north},
        receipt(session_event),
        {**receipt(event_id), "assignment_id": other},
    ]
    answers = set()
    for body in refused:
        r = await post(world, world.rival_workshop_mechanic, body)
        assert r.status_code == 404, (body, r.text)
        answers.add(json.dumps(r.json()))
    assert len(answers) == 1
    assert json.loads(answers.pop())["error"]["code"] == "alert_event_not_found"
    assert await stored(world) == 0
    # North Garage's own mechanic may report it.
    r = await post(world, world.workshop_mechanic, {**receipt(north_event), "assignment_id": north})
    assert r.status_code == 201
    assert r.json()["receipt"]["assignment_id"] == north


async def test_a_receipt_outlives_the_request_being_taken(world: World) -> None:
    """A mechanic alerted about a request another mechanic took a moment later still
    reports that alert (the event was theirs to see, though the request is not now)."""
    aid, event_id = await alerted(world)
    taker = world.other_mechanic.headers
    r = await world.client.post(f"/api/assignments/{aid}/accept", headers=taker)
    assert r.status_code == 200, r.text
    r = await post(world, world.mechanic, {**receipt(event_id), "assignment_id": aid})
    assert r.status_code == 201, r.text
    r = await post(world, world.mechanic, {"assignment_id": aid, **receipt(None)})
    assert r.status_code == 200 and r.json()["receipt"]["event_id"] == event_id


async def test_a_receipt_by_assignment_finds_the_alert_it_reports(world: World) -> None:
    """Without an event id (a page that alerted from a queue read), the receipt is about
    the latest event that gave the mechanic the request: the queueing, then the offer,
    which is an alert of its own and counted as one."""
    aid, queued_event = await alerted(world)
    by_assignment = {"assignment_id": aid, **receipt(None)}
    r = await post(world, world.mechanic, by_assignment)
    assert r.status_code == 201 and r.json()["receipt"]["event_id"] == queued_event
    r = await world.client.post(
        f"/api/assignments/{aid}/offer",
        json={"mechanic_id": str(world.mechanic.mechanic_id), "ttl_seconds": 90},
        headers=world.admin.headers,
    )
    assert r.status_code == 200, r.text
    offered_event = (await events(world, aid))["offered"]
    r = await post(world, world.mechanic, by_assignment)
    assert r.status_code == 201 and r.json()["receipt"]["event_id"] == offered_event
    assert (await post(world, world.mechanic, by_assignment)).status_code == 200
    # Another mechanic was given nothing by the offer: their alert is still the queueing.
    r = await post(world, world.other_mechanic, by_assignment)
    assert r.status_code == 201 and r.json()["receipt"]["event_id"] == queued_event
    assert await stored(world) == 3


async def test_the_database_refuses_unknown_tiers_from_any_writer(world: World) -> None:
    """The tier rule is the database's: api.record_alert_receipt answers 422 invalid_receipt
    and even the owner cannot insert a receipt with an unknown status."""
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            await conn.execute(
                "insert into alert_receipts (mechanic_user_id, event_id, tiers) values (%s, 1, %s)",
                (world.mechanic.id, json.dumps({"toast": {"status": "maybe"}})),
            )
        await conn.rollback()
        claims = json.dumps({"sub": str(world.mechanic.id), "role": "authenticated"})
        await conn.execute("select set_config('request.jwt.claims', %s, false)", (claims,))
        with pytest.raises(psycopg.Error) as raised:
            await conn.execute(
                "select * from api.record_alert_receipt(null, null, %s, null)",
                (json.dumps({"buzzer": {"status": "shown"}}),),
            )
        assert raised.value.diag.sqlstate == "AD422"
        assert raised.value.diag.message_hint == "invalid_receipt"
    assert await stored(world) == 0


async def test_alert_health_sums_up_the_window_for_admins(world: World) -> None:
    """Per tier counts, commit-to-shown percentiles and the newest failures with the
    mechanic's name, over the window asked for; older receipts stay out."""
    latencies = [100.0, 200.0, 300.0, 400.0, 1000.0]
    alerts = [await alerted(world) for _ in range(6)]
    for i, ms in enumerate(latencies):
        who = world.mechanic if i % 2 == 0 else world.workshop_mechanic
        tiers = {"toast": {"status": "shown"}, "sound": {"status": "shown"}}
        if i == 3:
            tiers["notification"] = {"status": "failed", "error": "permission denied"}
        body = {"tiers": tiers, "commit_to_shown_ms": ms, "event_id": alerts[i][1]}
        r = await post(world, who, body)
        assert r.status_code == 201
    r = await post(
        world, world.mechanic, {"tiers": {"sound": {"status": "failed"}}, "event_id": alerts[5][1]}
    )
    assert r.status_code == 201
    # An old one, outside a 60-minute window.
    old = await post(
        world,
        world.other_mechanic,
        {
            "tiers": {"title": {"status": "failed", "error": "old"}},
            "commit_to_shown_ms": 5,
            "event_id": alerts[0][1],
        },
    )
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        await conn.execute(
            "update alert_receipts set created_at = now() - interval '2 hours' where id = %s",
            (old.json()["receipt"]["id"],),
        )

    r = await world.client.get("/api/admin/alert-health", headers=world.admin.headers)
    assert r.status_code == 200, r.text
    health = r.json()
    assert health["window_minutes"] == 60
    assert set(health["tiers"]) == set(TIERS)
    assert health["tiers"]["toast"] == {"shown": 5, "failed": 0, "disabled": 0, "unsupported": 0}
    assert health["tiers"]["sound"] == {"shown": 5, "failed": 1, "disabled": 0, "unsupported": 0}
    assert health["tiers"]["notification"]["failed"] == 1
    assert health["tiers"]["title"] == {"shown": 0, "failed": 0, "disabled": 0, "unsupported": 0}
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    assert health["latency_ms"] == {
        "count": 5,
        "p50": 300.0,
        "p95": round(quantiles[94], 1),
        "p99": round(quantiles[98], 1),
    }
    failures = health["recent_failures"]
    # Newest first: the last receipt (Mo's), then the fourth (Wes's).
    assert [(f["tier"], f["error"], f["mechanic"]) for f in failures] == [
        ("sound", None, "Mo Mechanic"),
        ("notification", "permission denied", "Wes Workshop"),
    ]

    r = await world.client.get("/api/admin/alert-health?minutes=180", headers=world.admin.headers)
    assert r.json()["tiers"]["title"]["failed"] == 1
    assert r.json()["latency_ms"]["count"] == 6
    assert r.json()["recent_failures"][-1]["error"] == "old"

    r = await world.client.get("/api/admin/alert-health", headers=world.mechanic.headers)
    assert r.status_code == 403
    r = await world.client.get("/api/admin/alert-health?minutes=0", headers=world.admin.headers)
    assert r.status_code == 422
