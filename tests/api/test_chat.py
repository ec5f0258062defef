"""Session chat: the customer and the accepted mechanic only, while the session runs, live."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
from page_helpers import sse

from conftest import Account, LiveWorld, World


async def accepted(world: World, mechanic: Account | None = None) -> dict[str, Any]:
    pair = await world.queued()
    r = await world.client.post(
        f"/api/assignments/{pair['assignment']['id']}/accept",
        headers=(mechanic or world.mechanic).headers,
    )
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


async def say(world: World, who: Account, session_id: str, body: str) -> httpx.Response:
    return await world.client.post(
        f"/api/sessions/{session_id}/messages", json={"body": body}, headers=who.headers
    )


async def stored_messages(world: World) -> int:
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        cur = await conn.execute("select count(*) from session_messages")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_the_two_participants_chat_and_nobody_else_reads_it(world: World) -> None:
    """Customer and accepted mechanic write and read the chat, oldest first; another customer
    and another mechanic get 404, an admin 403, and row-level security shows them nothing."""
    pair = await accepted(world)
    sid = pair["session"]["id"]
    r = await say(world, world.customer, sid, "  Hello, the noise started yesterday.  ")
    assert r.status_code == 201, r.text
    message = r.json()["message"]
    assert set(message) == {
        "id",
        "session_id",
        "sender_id",
        "sender_name",
        "sender_role",
        "body",
        "created_at",
    }
    assert message["body"] == "Hello, the noise started yesterday."
    assert (message["session_id"], message["sender_id"]) == (sid, str(world.customer.id))
    assert (message["sender_role"], message["sender_name"]) == ("customer", "Cara Customer")
    r = await say(world, world.mechanic, sid, "Which wheel?")
    assert r.status_code == 201
    assert (r.json()["message"]["sender_role"], r.json()["message"]["sender_name"]) == (
        "mechanic",
        "Mo Mechanic",
    )

    for participant in (world.customer, world.mechanic):
        r = await world.client.get(f"/api/sessions/{sid}/messages", headers=participant.headers)
        assert r.status_code == 200
        assert r.headers["cache-control"] == "no-store"
        assert [m["body"] for m in r.json()["items"]] == [
            "Hello, the noise started yesterday.",
            "Which wheel?",
        ]

    for outsider in (world.other_customer, world.other_mechanic, world.workshop_mechanic):
        r = await world.client.get(f"/api/sessions/{sid}/messages", headers=outsider.headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    r = await world.client.get(f"/api/sessions/{sid}/messages", headers=world.admin.headers)
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_a_participant"
    r = await say(world, world.other_customer, sid, "let me in")
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    r = await say(world, world.other_mechanic, sid, "let me in")
    assert r.status_code == 404
    r = await say(world, world.admin, sid, "let me in")
    assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_role"
    r = await world.client.get(f"/api/sessions/{sid}/messages")
    assert r.status_code == 401

    # Row-level security itself, not only the routes: outsiders select no message.
    tokens = world.app.state.services.tokens
    for who, expected in (
        (world.customer, 2),
        (world.mechanic, 2),
        (world.admin, 0),
        (world.other_customer, 0),
        (world.other_mechanic, 0),
    ):
        async with world.app.state.services.db.as_principal(tokens.principal(who.token)) as tx:
            cur = await tx.conn.execute("select count(*) as n from session_messages")
            row = await cur.fetchone()
        assert row is not None and row["n"] == expected, who.email
    assert await stored_messages(world) == 2


async def test_chat_opens_at_acceptance_and_closes_when_the_session_ends(world: World) -> None:
    """Before a mechanic accepts and after the session ends, writing is refused with 409
    chat_closed (a mechanic who has not taken the request: 403); the history stays readable."""
    created = await world.request()
    sid = created["session"]["id"]
    r = await say(world, world.customer, sid, "anyone?")
    assert r.status_code == 409 and r.json()["error"]["code"] == "chat_closed"
    r = await world.client.post(f"/api/sessions/{sid}/waiver", headers=world.customer.headers)
    assert r.status_code == 200
    r = await say(world, world.customer, sid, "anyone?")
    assert r.status_code == 409 and r.json()["error"]["code"] == "chat_closed"
    r = await say(world, world.mechanic, sid, "I can see your request")
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_a_participant"
    r = await world.client.get(f"/api/sessions/{sid}/messages", headers=world.mechanic.headers)
    assert r.status_code == 403

    aid = created["assignment"]["id"]
    r = await world.client.post(f"/api/assignments/{aid}/accept", headers=world.mechanic.headers)
    assert r.status_code == 200
    assert (await say(world, world.mechanic, sid, "Hi, I took it")).status_code == 201
    r = await world.client.post(f"/api/sessions/{sid}/start", headers=world.customer.headers)
    assert r.status_code == 200
    assert (await say(world, world.customer, sid, "Thanks")).status_code == 201
    r = await world.client.post(f"/api/sessions/{sid}/end", headers=world.mechanic.headers)
    assert r.status_code == 200 and r.json()["session"]["status"] == "completed"
    for who in (world.customer, world.mechanic):
        r = await say(world, who, sid, "one more thing")
        assert r.status_code == 409 and r.json()["error"]["code"] == "chat_closed"
        assert "completed" in r.json()["error"]["message"]
    r = await world.client.get(f"/api/sessions/{sid}/messages", headers=world.customer.headers)
    assert [m["body"] for m in r.json()["items"]] == ["Hi, I took it", "Thanks"]
    assert await stored_messages(world) == 2


async def test_bad_messages_are_refused_and_change_nothing(world: World) -> None:
    """Empty, blank, too long or unknown-field bodies are 422; an unknown session 404."""
    sid = (await accepted(world))["session"]["id"]
    for body in (
        {"body": ""},
        {"body": "   "},
        {"body": "x" * 2001},
        {"body": "hi", "to": "everyone"},
        {},
        {"body": 5},
    ):
        r = await world.client.post(
            f"/api/sessions/{sid}/messages", json=body, headers=world.customer.headers
        )
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["code"] == "invalid_input"
    r = await say(world, world.customer, "00000000-0000-0000-0000-000000000000", "hi")
    assert r.status_code == 404
    assert (await say(world, world.customer, sid, "x" * 2000)).status_code == 201
    assert await stored_messages(world) == 1


async def test_messages_reach_the_two_participants_live_and_nobody_else(live: LiveWorld) -> None:
    """A message is a realtime event: both participants' subscriptions get it; another
    mechanic and an admin subscribed to the same table get nothing."""
    customer = await live.make("cara", "customer")
    mo = await live.make("mo", "mechanic")
    max_ = await live.make("max", "mechanic")
    admin = await live.make("ada", "admin")
    base = live.server.base
    async with httpx.AsyncClient(timeout=10) as client:
        pair = await live.queued(client, customer)
        sid, aid = pair["session"]["id"], pair["assignment"]["id"]
        r = await client.post(f"{base}/api/assignments/{aid}/accept", headers=mo.headers)
        assert r.status_code == 200
        async with (
            sse(client, base, customer.headers, "session_messages") as customer_feed,
            sse(client, base, mo.headers, "session_messages") as mo_feed,
            sse(client, base, max_.headers, "session_messages") as max_feed,
            sse(client, base, admin.headers, "session_messages") as admin_feed,
        ):
            r = await client.post(
                f"{base}/api/sessions/{sid}/messages",
                json={"body": "Is it the front left?"},
                headers=mo.headers,
            )
            assert r.status_code == 201
            message = r.json()["message"]
            for feed in (customer_feed, mo_feed):
                data = await feed.change()
                assert (data["table"], data["type"]) == ("session_messages", "INSERT")
                record = data["record"]
                assert record["id"] == message["id"]
                assert record["body"] == "Is it the front left?"
                assert record["sender_name"] == "Mo" and record["sender_role"] == "mechanic"
                assert "visibility_keys" not in record
            assert await max_feed.silent(0.5)
            assert await admin_feed.silent(0.1)
