"""The Web Push sender, end to end: a request a mechanic may take is pushed, encrypted and
VAPID-signed, to a local push service that decrypts it as the browser would; and what
the sender must not do: reach internal addresses, follow redirects, wait on a slow
service past its deadline, store a service's words, or hold a transaction while sending."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from page_helpers import Browser, Push, PushService, check_vapid, metric, open_world

from conftest import Account, World, number_committed, request_body

SUBJECT = "mailto:admin@localhost"


@pytest.fixture
def push_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PushService]:
    service = PushService(tmp_path)
    # The sender trusts the service's self-signed certificate (read when the app is made).
    monkeypatch.setenv("SSL_CERT_FILE", str(service.ca_file))
    try:
        yield service
    finally:
        service.hold.clear()
        service.stop()


@pytest.fixture
def allowed_hosts(push_service: PushService) -> tuple[str, ...]:
    """AUTODISPATCH_PUSH_ALLOWED_HOSTS: the local push service (a loopback address, which
    the sender refuses unless told otherwise)."""
    return (push_service.host,)


@pytest.fixture
async def world(
    db_url: str, tmp_path: Path, push_service: PushService, allowed_hosts: tuple[str, ...]
) -> AsyncIterator[World]:
    async with open_world(db_url, tmp_path, push_allowed_hosts=allowed_hosts) as w:
        yield w


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
    await number_committed(world.app.state.services.db.url)
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
    (failures, and in last_error the status, never what the service wrote) and counted;
    the others still get their push."""
    await subscribe(world, world.mechanic, push_service, "mo")
    await subscribe(world, world.workshop_mechanic, push_service, "wes")
    await subscribe(world, world.rival_workshop_mechanic, push_service, "rita")
    push_service.answers = {"/push/rita": 410, "/push/wes": 500}
    push_service.bodies = {"/push/wes": b"db=postgresql://admin:hunter2@10.0.0.5/prod"}

    await world.queued()
    await push_service.wait_for(3)

    async def recorded() -> bool:
        state = await subscriptions(world)
        return set(state) == {"mo", "wes"} and state["wes"][1] == 1

    await eventually(recorded)
    state = await subscriptions(world)
    assert state["mo"][0] is not None and state["mo"][1:] == (0, None)
    assert state["wes"][0] is None and state["wes"][2] == "HTTP 500 Internal Server Error"
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


async def test_a_request_back_in_the_queue_is_not_pushed_again(
    world: World, push_service: PushService
) -> None:
    """A request is pushed when first queued and when offered; declined (or expired) back
    into the queue, it alerts nobody again, as the pages do not."""
    await subscribe(world, world.mechanic, push_service, "mo")
    await subscribe(world, world.workshop_mechanic, push_service, "wes")
    pair = await world.queued()
    aid = pair["assignment"]["id"]
    await push_service.wait_for(2)
    r = await world.client.post(
        f"/api/assignments/{aid}/offer",
        json={"mechanic_id": str(world.mechanic.mechanic_id), "ttl_seconds": 90},
        headers=world.admin.headers,
    )
    assert r.status_code == 200, r.text
    await push_service.wait_for(3)
    r = await world.client.post(f"/api/assignments/{aid}/decline", headers=world.mechanic.headers)
    assert r.status_code == 200, r.text
    assert r.json()["assignment"]["status"] == "queued"
    back = await event_id(world, aid, "queued")

    async def past_it() -> bool:
        cursor = await sql(world, "select last_id from realtime.push_cursor")
        return bool(cursor[0][0] >= back)

    await eventually(past_it)
    await asyncio.sleep(0.5)
    assert [p.path for p in push_service.pushes] in (
        ["/push/mo", "/push/wes", "/push/mo"],
        ["/push/wes", "/push/mo", "/push/mo"],
    )


async def test_redirects_are_not_followed(world: World, push_service: PushService) -> None:
    """A 307 pointing elsewhere is a failed push: nothing is sent where it points, and
    last_error says the redirect was not followed."""
    await subscribe(world, world.mechanic, push_service, "mo")
    push_service.answers = {"/push/mo": 307}
    push_service.locations = {"/push/mo": f"{push_service.origin}/push/internal"}
    await world.queued()
    await push_service.wait_for(1)

    async def failed() -> bool:
        return (await subscriptions(world))["mo"][1] == 1

    await eventually(failed)
    assert (await subscriptions(world))["mo"][2] == "HTTP 307: redirects are not followed"
    await asyncio.sleep(0.5)
    assert push_service.to("internal") == []


async def test_a_push_service_that_trickles_is_cut_off_at_the_deadline(
    world: World, push_service: PushService
) -> None:
    """A push service that answers a byte every 0.2 s (never slow enough for a read
    timeout) is cut off at the push's total deadline, and the next request still goes."""
    world.app.state.push.client.deadline = 1.0
    await subscribe(world, world.mechanic, push_service, "mo")
    push_service.trickle = {"/push/mo"}
    started = time.monotonic()
    await world.queued()

    async def timed_out() -> bool:
        return (await subscriptions(world))["mo"][1] == 1

    await eventually(timed_out, timeout=6.0)
    assert time.monotonic() - started < 6.0
    assert (await subscriptions(world))["mo"][2] == "no answer within 1 s"
    push_service.trickle = set()
    await world.queued()
    await push_service.wait_for(2)

    async def sent() -> bool:
        return (await subscriptions(world))["mo"][1] == 0

    await eventually(sent)


async def test_a_subscription_that_keeps_failing_is_deleted(
    world: World, push_service: PushService
) -> None:
    """After max_failures failed pushes in a row a subscription is deleted (and counted);
    a push that goes through in between starts the count again."""
    world.app.state.push.max_failures = 3
    await subscribe(world, world.mechanic, push_service, "mo")
    push_service.answers = {"/push/mo": 503}
    for count in (1, 2):
        await world.queued()
        await push_service.wait_for(count)

    async def failed_twice() -> bool:
        return (await subscriptions(world))["mo"][1] == 2

    await eventually(failed_twice)
    await world.queued()
    await push_service.wait_for(3)

    async def deleted() -> bool:
        return "mo" not in await subscriptions(world)

    await eventually(deleted)
    assert await metric(world.client, "autodispatch_push_subscriptions_disabled_total") == 1
    await world.queued()
    await asyncio.sleep(1.0)
    assert len(push_service.pushes) == 3


async def test_no_transaction_is_open_while_pushes_are_out(
    world: World, push_service: PushService
) -> None:
    """While a push service takes its time, the sender holds no transaction: the cursor
    row is free (leased, not locked), no connection idles in a transaction, and a
    mechanic can remove a subscription at once."""
    await subscribe(world, world.mechanic, push_service, "mo")
    await subscribe(world, world.workshop_mechanic, push_service, "wes")
    push_service.hold.set()
    await world.queued()
    assert await asyncio.to_thread(push_service.held.wait, 10)
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        await conn.execute("set lock_timeout = '1s'")
        cur = await conn.execute(
            "select lease_owner, lease_expires_at > now() from realtime.push_cursor"
            " for update nowait"
        )
        assert await cur.fetchone() == (world.app.state.push.owner, True)
        await conn.rollback()
        cur = await conn.execute(
            "select count(*) from pg_stat_activity where datname = current_database()"
            " and state like 'idle in transaction%%' and pid <> pg_backend_pid()"
        )
        assert await cur.fetchone() == (0,)
    r = await asyncio.wait_for(
        world.client.request(
            "DELETE",
            "/api/push/subscriptions",
            json={"endpoint": push_service.endpoint("wes")},
            headers=world.workshop_mechanic.headers,
        ),
        timeout=2,
    )
    assert r.status_code == 204
    push_service.hold.clear()

    async def done() -> bool:
        state = await subscriptions(world)
        return set(state) == {"mo"} and state["mo"][0] is not None

    await eventually(done)
    head = await sql(world, "select last_id from realtime.stream")
    assert await sql(world, "select last_id from realtime.push_cursor") == head


async def test_a_sender_whose_batch_was_taken_over_does_not_move_the_cursor(
    world: World, push_service: PushService
) -> None:
    """The cursor moves by compare-and-set: when another sender advanced it while this
    one was sending, this one leaves it alone (and says so)."""
    await subscribe(world, world.mechanic, push_service, "mo")
    push_service.hold.set()
    await world.queued()
    assert await asyncio.to_thread(push_service.held.wait, 10)
    before = await sql(world, "select last_id from realtime.push_cursor")
    async with await psycopg.AsyncConnection.connect(
        world.app.state.services.db.url, autocommit=True
    ) as conn:
        await conn.execute("set lock_timeout = '1s'")
        # Another sender took the lease, sent the batch and moved the cursor one further.
        await conn.execute(
            "update realtime.push_cursor set last_id = last_id + 1000000,"
            " lease_owner = null, lease_expires_at = null"
        )
    push_service.hold.clear()

    async def raced() -> bool:
        n = await metric(world.client, "autodispatch_push_runs_total", outcome="raced")
        return n == 1

    await eventually(raced)
    after = await sql(world, "select last_id from realtime.push_cursor")
    assert after == [(before[0][0] + 1000000,)]
    assert (await subscriptions(world))["mo"][0] is not None  # its outcome is recorded


async def test_a_running_lease_makes_other_senders_wait(
    world: World, push_service: PushService
) -> None:
    """A cursor leased to another process (sending right now) is left alone until its
    lease runs out; then this one sends, from the cursor."""
    await subscribe(world, world.mechanic, push_service, "mo")
    await sql(
        world,
        "update realtime.push_cursor set lease_owner = gen_random_uuid(),"
        " lease_expires_at = now() + interval '1 hour'",
    )
    await world.queued()

    async def busy() -> bool:
        return await metric(world.client, "autodispatch_push_runs_total", outcome="busy") >= 2

    await eventually(busy)
    assert push_service.pushes == []
    await sql(world, "update realtime.push_cursor set lease_expires_at = now()")
    await push_service.wait_for(1)


async def test_a_missing_cursor_row_is_reported_not_taken_for_busy(
    world: World, push_service: PushService
) -> None:
    """Without its realtime.push_cursor row the sender sends nothing and counts each run
    as missing (not busy, which would blame another process); with it back, it sends."""
    await subscribe(world, world.mechanic, push_service, "mo")
    (last_id,) = (await sql(world, "delete from realtime.push_cursor returning last_id"))[0]
    await world.queued()

    async def missing() -> bool:
        n = await metric(world.client, "autodispatch_push_runs_total", outcome="missing")
        return n >= 2

    await eventually(missing)
    assert await metric(world.client, "autodispatch_push_runs_total", outcome="busy") == 0
    assert push_service.pushes == []
    await sql(world, "insert into realtime.push_cursor (id, last_id) values (1, %s)", (last_id,))
    await push_service.wait_for(1)


@pytest.mark.parametrize("allowed_hosts", [()])
async def test_internal_addresses_are_refused_when_sending_too(
    world: World, push_service: PushService
) -> None:
    """Without the allow-list, the sender connects to no loopback address: not to a
    subscription written straight into the table, nor to a name that resolved to a
    public address when it was saved and to a loopback one now."""
    policy = world.app.state.push.policy
    answers = {"push.example.net": ["93.184.215.14"]}

    async def resolve(host: str, port: int) -> list[str]:
        return answers[host]

    policy.resolve = resolve
    rebinding = f"https://push.example.net:{push_service.port}/push/rebind"
    r = await world.client.post(
        "/api/push/subscriptions",
        json={"endpoint": rebinding, "keys": {"p256dh": Browser().p256dh, "auth": Browser().auth}},
        headers=world.mechanic.headers,
    )
    assert r.status_code == 201, r.text
    answers["push.example.net"] = ["127.0.0.1"]
    browser = Browser()
    await sql(
        world,
        "insert into push_subscriptions (user_id, endpoint, p256dh, auth) values (%s, %s, %s, %s)",
        (world.workshop_mechanic.id, push_service.endpoint("direct"), browser.p256dh, browser.auth),
    )
    await world.queued()

    async def refused() -> bool:
        state = await subscriptions(world)
        return state["rebind"][1] == 1 and state["direct"][1] == 1

    await eventually(refused)
    state = await subscriptions(world)
    assert state["direct"][2] == (
        "endpoint refused: the host is an IP address, not the push service's name"
    )
    assert state["rebind"][2] == (
        "endpoint refused: push.example.net resolves to an address that is not public"
    )
    await asyncio.sleep(0.5)
    assert push_service.pushes == []
