"""The Web Push sender, end to end: a request a mechanic may take is pushed, encrypted and
VAPID-signed, to a local push service that decrypts it as the browser would."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from page_helpers import Browser, Push, PushService, check_vapid, metric

from conftest import Account, World, request_body

SUBJECT = "mailto:admin@localhost"


@pytest.fixture
def push_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PushService]:
    service = PushService(tmp_path)
    # requests (inside pywebpush) trusts the service's self-signed certificate.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(service.ca_file))
    try:
        yield service
    finally:
        service.stop()


async def subscribe(world: World, who: Account, service: PushService, name: str) -> Browser:
    browser = Browser()
    r = await world.client.post(
        "/api/push/subscriptions",
        json={
            "endpoint": service.endpoint(name),
            "keys": {"p256dh": browser.p256dh, "auth": browser.auth},
        },
        headers=who.headers,
    )
    assert r.status_code == 201, r.text
    return browser


async def sql(world: World, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


async def subscriptions(world: World) -> dict[str, tuple[Any, ...]]:
    """endpoint path name -> (last_sent_at, failures, last_error)."""
    found = await sql(
        world, "select endpoint, last_sent_at, failures, last_error from push_subscriptions"
    )
    return {row[0].rsplit("/", 1)[1]: row[1:] for row in found}


async def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert await check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def event_id(world: World, assignment_id: str, status: str) -> int:
    rows = await sql(
        world,
        "select id from realtime.events where table_name = 'session_assignments'"
        " and row_id = %s and record ->> 'status' = %s order by id desc limit 1",
        (assignment_id, status),
    )
    return int(rows[0][0])


def check_push(
    push: Push, browser: Browser, public_key: str, service: PushService
) -> dict[str, Any]:
    """The push's headers and signature are right; its decrypted payload."""
    assert push.headers["content-encoding"] == "aes128gcm"
    assert push.headers["urgency"] == "high"
    assert 0 < int(push.headers["ttl"]) <= 3600  # the tests' request TTL
    assert len(push.body) <= 4096
    check_vapid(push, public_key, service.origin, SUBJECT)
    payload = browser.decrypt(push.body)
    assert push.headers["topic"] == payload["assignment_id"].replace("-", "")
    return payload


async def test_a_takeable_request_is_pushed_to_exactly_the_mechanics_who_may_take_it(
    world: World, push_service: PushService
) -> None:
    """A general request reaches every subscribed mechanic, a workshop's request only its
    mechanics, an offer only its target; each push decrypts to the request's summary, its
    assignment and event ids, and carries a VAPID signature of our public key."""
    public_key = (await world.client.get("/api/push/public-key")).json()["public_key"]
    browsers = {
        "mo": await subscribe(world, world.mechanic, push_service, "mo"),
        "wes": await subscribe(world, world.workshop_mechanic, push_service, "wes"),
        "rita": await subscribe(world, world.rival_workshop_mechanic, push_service, "rita"),
    }

    pair = await world.queued()
    aid = pair["assignment"]["id"]
    await push_service.wait_for(3)
    expected_event = await event_id(world, aid, "queued")
    for name, browser in browsers.items():
        (push,) = push_service.to(name)
        payload = check_push(push, browser, public_key, push_service)
        assert payload["type"] == "new_request"
        assert (payload["assignment_id"], payload["session_id"]) == (aid, pair["session"]["id"])
        assert (payload["event_id"], payload["status"]) == (expected_event, "queued")
        summary = payload["request_summary"]
        assert summary["customer_first_name"] == "Dana"
        assert summary["vehicle"] == "2016 Toyota Corolla"
        assert summary["concern"] == "Grinding noise when braking"
        assert summary["session_type"] == "free"
        assert payload["title"] == "New request: 2016 Toyota Corolla"
        assert payload["body"] == "Dana: Grinding noise when braking"
        assert payload["tag"] == f"request-{aid}"
        assert payload["committed_at"] and payload["expires_at"]

    workshop = await world.queued(workshop_id=world.workshop_id)
    await push_service.wait_for(4)
    push = push_service.pushes[3]
    assert push.path == "/push/wes"
    assert browsers["wes"].decrypt(push.body)["assignment_id"] == workshop["assignment"]["id"]

    offered = await world.queued()
    await push_service.wait_for(7)
    r = await world.client.post(
        f"/api/assignments/{offered['assignment']['id']}/offer",
        json={"mechanic_id": str(world.mechanic.mechanic_id), "ttl_seconds": 90},
        headers=world.admin.headers,
    )
    assert r.status_code == 200, r.text
    await push_service.wait_for(8)
    push = push_service.pushes[7]
    assert push.path == "/push/mo" and int(push.headers["ttl"]) <= 90
    payload = check_push(push, browsers["mo"], public_key, push_service)
    assert (payload["assignment_id"], payload["status"]) == (offered["assignment"]["id"], "offered")

    await asyncio.sleep(1.0)  # nothing else is on its way
    counts = {name: len(push_service.to(name)) for name in browsers}
    assert counts == {"mo": 3, "wes": 3, "rita": 2}
    state = await subscriptions(world)
    assert all(sent is not None and failures == 0 for sent, failures, _ in state.values())
    assert await metric(world.client, "autodispatch_push_sends_total", outcome="sent") == 8
    head = await sql(world, "select last_id from realtime.stream")
    cursor = await sql(world, "select last_id from realtime.push_cursor")
    assert cursor == head


async def test_gone_subscriptions_are_deleted_and_failures_recorded(
    world: World, push_service: PushService
) -> None:
    """A 410 from the push service deletes the subscription; a 500 is recorded on it
    (failures, last_error) and counted; the others still get their push."""
    await subscribe(world, world.mechanic, push_service, "mo")
    await subscribe(world, world.workshop_mechanic, push_service, "wes")
    await subscribe(world, world.rival_workshop_mechanic, push_service, "rita")
    push_service.answers = {"/push/rita": 410, "/push/wes": 500}

    await world.queued()
    await push_service.wait_for(3)

    async def recorded() -> bool:
        state = await subscriptions(world)
        return set(state) == {"mo", "wes"} and state["wes"][1] == 1

    await eventually(recorded)
    state = await subscriptions(world)
    assert state["mo"][0] is not None and state["mo"][1:] == (0, None)
    assert state["wes"][0] is None and state["wes"][2].startswith("HTTP 500")
    sends = {
        outcome: await metric(world.client, "autodispatch_push_sends_total", outcome=outcome)
        for outcome in ("sent", "failed", "gone")
    }
    assert sends == {"sent": 1, "failed": 1, "gone": 1}

    await world.queued()
    await push_service.wait_for(5)

    async def failed_twice() -> bool:
        return (await subscriptions(world))["wes"][1] == 2

    await eventually(failed_twice)
    assert [p.path for p in push_service.pushes[3:]].count("/push/rita") == 0


async def test_nothing_is_pushed_while_alerts_are_off_or_once_the_request_is_gone(
    world: World, push_service: PushService
) -> None:
    """With notifications switched off no push is sent; a request taken in the same
    transaction that queued it is not pushed; the next request is, once: touching it
    later pushes nothing."""
    browser = await subscribe(world, world.mechanic, push_service, "mo")
    r = await world.client.patch(
        "/api/feature-flags/mech_browser_notifications",
        json={"enabled": False},
        headers=world.admin.headers,
    )
    assert r.status_code == 200
    await world.queued()

    async def skipped_flag() -> bool:
        n = await metric(world.client, "autodispatch_push_skipped_total", reason="alerts_off")
        return n == 1

    await eventually(skipped_flag)
    r = await world.client.patch(
        "/api/feature-flags/mech_browser_notifications",
        json={"enabled": True},
        headers=world.admin.headers,
    )
    assert r.status_code == 200

    created = await world.request()
    sid, aid = created["session"]["id"], created["assignment"]["id"]
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        for who, statement, param in (
            (world.customer, "select api.sign_waiver(%s, 'Cara')", sid),
            (world.other_mechanic, "select api.accept_assignment(%s)", aid),
        ):
            claims = json.dumps({"sub": str(who.id), "role": "authenticated"})
            await conn.execute("select set_config('request.jwt.claims', %s, true)", (claims,))
            await conn.execute(statement, (param,))

    async def skipped_taken() -> bool:
        n = await metric(world.client, "autodispatch_push_skipped_total", reason="no_longer_open")
        return n == 1

    await eventually(skipped_taken)
    later = await world.queued()
    (push,) = await push_service.wait_for(1)
    assert browser.decrypt(push.body)["assignment_id"] == later["assignment"]["id"]
    # A change that gives nobody new access (a queued request touched) is no new request.
    await sql(
        world,
        "update session_assignments set updated_at = now() where id = %s",
        (later["assignment"]["id"],),
    )
    await asyncio.sleep(1.0)
    assert len(push_service.pushes) == 1


async def test_one_process_sends_at_a_time(world: World, push_service: PushService) -> None:
    """While another process holds the push cursor, this one sends nothing; once it lets
    go, the request is pushed (from the cursor: nothing is lost)."""
    await subscribe(world, world.mechanic, push_service, "mo")
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        await conn.execute("select * from realtime.push_cursor for update")
        await world.queued()

        async def busy() -> bool:
            return await metric(world.client, "autodispatch_push_runs_total", outcome="busy") >= 2

        await eventually(busy)
        assert push_service.pushes == []
    await push_service.wait_for(1)


async def test_a_long_concern_is_shortened_to_fit_one_push(
    world: World, push_service: PushService
) -> None:
    """A 2000-character concern in four-byte characters still goes out in one record of at
    most 4096 bytes, shortened with an ellipsis."""
    browser = await subscribe(world, world.mechanic, push_service, "mo")
    body = request_body()
    body["intake"]["concern"] = "\N{WRENCH}" * 2000
    r = await world.client.post("/api/sessions", json=body, headers=world.customer.headers)
    assert r.status_code == 201, r.text
    r = await world.client.post(
        f"/api/sessions/{r.json()['session']['id']}/waiver", headers=world.customer.headers
    )
    assert r.status_code == 200
    (push,) = await push_service.wait_for(1)
    assert len(push.body) <= 4096
    payload = browser.decrypt(push.body)
    concern = payload["request_summary"]["concern"]
    assert concern.endswith("…") and set(concern[:-1]) == {"\N{WRENCH}"}
    assert 100 < len(concern) < 2000
    assert payload["body"].startswith("Dana: \N{WRENCH}") and len(payload["body"]) <= 140
