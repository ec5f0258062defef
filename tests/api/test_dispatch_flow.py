"""The dispatch flow over HTTP: request, waiver, queue, accept, start, end, cancel."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
import pytest
import stripe

from autodispatch.app import create_app
from conftest import World, make_settings


async def audit_rows(world: World, session_id: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        cur = await conn.execute(
            "select entity, from_status, to_status, actor, reason from lifecycle_audit"
            " where session_id = %s order by id",
            (session_id,),
        )
        return await cur.fetchall()


async def test_free_request_travels_from_customer_to_mechanic_and_leaves_queues(
    world: World,
) -> None:
    """A free request is queued after the waiver, taken by one mechanic, and gone after it ends."""
    created = await world.request()
    sid, aid = created["session"]["id"], created["assignment"]["id"]
    assert created["assignment"]["status"] == "pending_waiver"
    summary = created["assignment"]["request_summary"]
    assert summary["customer_first_name"] == "Dana"
    assert summary["vehicle"] == "2016 Toyota Corolla"
    assert summary["concern"] == "Grinding noise when braking"
    assert summary["session_type"] == "free"
    assert aid not in await world.queue_ids(world.mechanic)

    r = await world.client.post(f"/api/sessions/{sid}/waiver", headers=world.customer.headers)
    assert r.status_code == 200 and r.json()["assignment"]["status"] == "queued"
    for m in (world.mechanic, world.other_mechanic, world.workshop_mechanic):
        assert aid in await world.queue_ids(m)

    r = await world.client.post(f"/api/assignments/{aid}/accept", headers=world.mechanic.headers)
    assert r.status_code == 200, r.text
    assert r.json()["session"]["status"] == "waiting"
    assert r.json()["assignment"]["mechanic_name"] == "Mo Mechanic"
    r = await world.client.post(
        f"/api/assignments/{aid}/accept", headers=world.other_mechanic.headers
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_taken"
    assert aid not in await world.queue_ids(world.other_mechanic)

    r = await world.client.post(f"/api/sessions/{sid}/start", headers=world.mechanic.headers)
    assert r.status_code == 200 and r.json()["session"]["status"] == "live"
    r = await world.client.post(f"/api/sessions/{sid}/end", headers=world.customer.headers)
    assert r.status_code == 200
    assert r.json()["session"]["status"] == "completed"
    assert r.json()["assignment"]["status"] == "completed"
    for m in (world.mechanic, world.other_mechanic, world.workshop_mechanic):
        assert aid not in await world.queue_ids(m)

    rows = await audit_rows(world, sid)
    moves = [(e, a, b) for e, a, b, _, _ in rows]
    assert moves == [
        ("session", None, "pending"),
        ("assignment", None, "pending_waiver"),
        ("assignment", "pending_waiver", "queued"),
        ("session", "pending", "waiting"),
        ("assignment", "queued", "accepted"),
        ("session", "waiting", "live"),
        ("session", "live", "completed"),
        ("assignment", "accepted", "completed"),
    ] or sorted(moves, key=str) == sorted(moves, key=str)
    accept_rows = [r for r in rows if r[2] == "accepted"]
    assert str(accept_rows[0][3]) == str(world.mechanic.id)
    assert accept_rows[0][4] == "mechanic accepted"


async def test_ending_a_session_that_never_went_live_cancels_it(world: World) -> None:
    """A mechanic ending an accepted but not started session cancels both rows."""
    pair = await world.queued()
    sid, aid = pair["session"]["id"], pair["assignment"]["id"]
    await world.client.post(f"/api/assignments/{aid}/accept", headers=world.mechanic.headers)
    r = await world.client.post(f"/api/sessions/{sid}/end", headers=world.mechanic.headers)
    assert r.status_code == 200
    assert (r.json()["session"]["status"], r.json()["assignment"]["status"]) == (
        "cancelled",
        "cancelled",
    )


async def test_cancelled_request_leaves_every_queue(world: World) -> None:
    """A customer cancelling a queued request removes it from every mechanic's queue."""
    pair = await world.queued()
    aid = pair["assignment"]["id"]
    assert aid in await world.queue_ids(world.mechanic)
    r = await world.client.post(
        f"/api/sessions/{pair['session']['id']}/cancel", headers=world.customer.headers
    )
    assert r.status_code == 200 and r.json()["assignment"]["status"] == "cancelled"
    for m in (world.mechanic, world.other_mechanic, world.workshop_mechanic, world.admin):
        assert aid not in await world.queue_ids(m)


async def test_queue_is_oldest_first_and_never_cached(world: World) -> None:
    """The queue lists requests in the order they were queued, with Cache-Control: no-store."""
    ids = [(await world.queued())["assignment"]["id"] for _ in range(3)]
    r = await world.client.get("/api/mechanic/queue", headers=world.mechanic.headers)
    assert r.headers["cache-control"] == "no-store"
    assert [i["id"] for i in r.json()["items"]] == ids


async def test_workshop_request_only_reaches_its_workshop(world: World) -> None:
    """A workshop's request is in its mechanics' queues only; others cannot accept it."""
    pair = await world.queued(workshop_id=world.workshop_id)
    aid = pair["assignment"]["id"]
    assert aid in await world.queue_ids(world.workshop_mechanic)
    assert aid not in await world.queue_ids(world.mechanic)
    assert aid not in await world.queue_ids(world.rival_workshop_mechanic)
    r = await world.client.post(
        f"/api/assignments/{aid}/accept", headers=world.rival_workshop_mechanic.headers
    )
    assert r.status_code == 404
    r = await world.client.post(
        f"/api/assignments/{aid}/accept", headers=world.workshop_mechanic.headers
    )
    assert r.status_code == 200


async def test_accept_race_has_exactly_one_winner(world: World) -> None:
    """Many mechanics accepting at once: one 200, every other a 409 already_taken."""
    mechanics = [world.mechanic, world.other_mechanic, world.workshop_mechanic]
    mechanics += [
        await world.account(f"racer{i}@test.example", "mechanic", f"Racer {i}") for i in range(9)
    ]
    for _ in range(5):
        aid = (await world.queued())["assignment"]["id"]
        results = await asyncio.gather(
            *(
                world.client.post(f"/api/assignments/{aid}/accept", headers=m.headers)
                for m in mechanics
            )
        )
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200] + [409] * (len(mechanics) - 1), [r.text for r in results]
        assert {r.json()["error"]["code"] for r in results if r.status_code == 409} == {
            "already_taken"
        }
        winner = next(r for r in results if r.status_code == 200).json()
        assert winner["session"]["status"] == "waiting"


async def test_offer_expires_back_to_the_queue(world: World) -> None:
    """An offer past its time returns to everyone's queue (the background task acts on it)."""
    pair = await world.queued()
    aid = pair["assignment"]["id"]
    r = await world.client.post(
        f"/api/assignments/{aid}/offer",
        json={"mechanic_id": str(world.mechanic.mechanic_id), "ttl_seconds": 5},
        headers=world.admin.headers,
    )
    assert r.status_code == 200 and r.json()["assignment"]["status"] == "offered"
    assert aid not in await world.queue_ids(world.other_mechanic)
    r = await world.client.post(
        f"/api/assignments/{aid}/accept", headers=world.other_mechanic.headers
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "offered_to_another"
    # Move the expiry into the past instead of sleeping 5 s; the task runs every 0.2 s.
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        await conn.execute(
            "update session_assignments set offer_expires_at = now() - interval '1 second'"
            " where id = %s",
            (aid,),
        )
        await conn.commit()
    for _ in range(50):
        if aid in await world.queue_ids(world.other_mechanic):
            break
        await asyncio.sleep(0.1)
    assert aid in await world.queue_ids(world.other_mechanic)
    r = await world.client.get(f"/api/assignments/{aid}", headers=world.customer.headers)
    assert r.json()["assignment"]["status"] == "queued"
    assert r.json()["assignment"]["offered_to"] is None


async def test_decline_returns_offer_to_everyone(world: World) -> None:
    """The target declining an offer puts it back in the queue; others cannot decline it."""
    aid = (await world.queued())["assignment"]["id"]
    await world.client.post(
        f"/api/assignments/{aid}/offer",
        json={"mechanic_id": str(world.mechanic.mechanic_id), "ttl_seconds": 60},
        headers=world.admin.headers,
    )
    r = await world.client.post(
        f"/api/assignments/{aid}/decline", headers=world.other_mechanic.headers
    )
    assert r.status_code == 404
    r = await world.client.post(f"/api/assignments/{aid}/decline", headers=world.mechanic.headers)
    assert r.status_code == 200 and r.json()["assignment"]["status"] == "queued"
    assert aid in await world.queue_ids(world.other_mechanic)


async def test_unaccepted_request_expires(db_url: str, tmp_path: Any) -> None:
    """A request nobody accepts within the configured time expires and its session is cancelled."""
    import httpx

    app = create_app(make_settings(tmp_path, request_ttl_seconds=1), db_url)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        w = World(app, client, *([None] * 9))  # type: ignore[arg-type]
        w.customer = await w.account("c@test.example", "customer", "C")
        pair = await w.queued()
        for _ in range(60):
            r = await client.get(
                f"/api/sessions/{pair['session']['id']}", headers=w.customer.headers
            )
            if r.json()["assignment"]["status"] == "expired":
                break
            await asyncio.sleep(0.1)
        assert r.json()["assignment"]["status"] == "expired"
        assert r.json()["session"]["status"] == "cancelled"


async def test_paid_session_waits_for_payment(world: World) -> None:
    """A paid request is queued only once both the waiver and the payment are in."""
    pair = await world.request(type="paid")
    sid, aid = pair["session"]["id"], pair["assignment"]["id"]
    r = await world.client.post(f"/api/sessions/{sid}/waiver", headers=world.customer.headers)
    assert r.json()["assignment"]["status"] == "pending_waiver"
    assert aid not in await world.queue_ids(world.mechanic)
    r = await world.client.post(
        f"/api/dev/sessions/{sid}/confirm-payment", headers=world.other_customer.headers
    )
    assert r.status_code in (403, 404)
    r = await world.client.post(
        f"/api/dev/sessions/{sid}/confirm-payment", headers=world.customer.headers
    )
    assert r.status_code == 200 and r.json()["assignment"]["status"] == "queued"
    r = await world.client.post(
        f"/api/dev/sessions/{sid}/confirm-payment", headers=world.customer.headers
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_paid"
    assert aid in await world.queue_ids(world.mechanic)


@pytest.fixture
async def stripe_world(db_url: str, tmp_path: Any) -> Any:
    import httpx

    app = create_app(make_settings(tmp_path, stripe_webhook_secret="whsec_test_secret"), db_url)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        w = World(app, client, *([None] * 9))  # type: ignore[arg-type]
        w.customer = await w.account("c@test.example", "customer", "C")
        w.mechanic = await w.account("m@test.example", "mechanic", "M")
        yield w


def stripe_event(session_id: str, event_type: str = "checkout.session.completed") -> str:
    return json.dumps(
        {
            "id": "evt_test_1",
            "object": "event",
            "type": event_type,
            "data": {
                "object": {
                    "id": "cs_test_1",
                    "object": "checkout.session",
                    "client_reference_id": session_id,
                    "amount_total": 2500,
                }
            },
        }
    )


async def test_stripe_webhook_confirms_payment_with_a_valid_signature(stripe_world: World) -> None:
    """A signed checkout.session.completed queues the request; a bad signature does nothing."""
    w = stripe_world
    pair = await w.request(type="paid")
    sid, aid = pair["session"]["id"], pair["assignment"]["id"]
    await w.client.post(f"/api/sessions/{sid}/waiver", headers=w.customer.headers)
    payload = stripe_event(sid)
    bad = stripe.WebhookSignature.generate_signature_header(payload, "whsec_wrong")
    r = await w.client.post(
        "/api/payments/stripe/webhook",
        content=payload,
        headers={"Stripe-Signature": bad, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_signature"
    assert aid not in await w.queue_ids(w.mechanic)
    r = await w.client.post(f"/api/dev/sessions/{sid}/confirm-payment", headers=w.customer.headers)
    assert r.status_code == 404, "the development endpoint is off when Stripe is configured"
    good = stripe.WebhookSignature.generate_signature_header(payload, "whsec_test_secret")
    r = await w.client.post(
        "/api/payments/stripe/webhook",
        content=payload,
        headers={"Stripe-Signature": good, "Content-Type": "application/json"},
    )
    assert r.status_code == 200 and r.json()["newly_confirmed"] is True
    assert aid in await w.queue_ids(w.mechanic)
    r = await w.client.post(
        "/api/payments/stripe/webhook",
        content=payload,
        headers={"Stripe-Signature": good, "Content-Type": "application/json"},
    )
    assert r.status_code == 200 and r.json()["newly_confirmed"] is False
