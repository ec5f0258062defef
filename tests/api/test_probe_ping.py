"""Probe pings: any signed-in user causes a harmless change that reaches them and nobody else."""

from __future__ import annotations

import httpx
from page_helpers import sse

from conftest import LiveWorld, World


async def test_any_signed_in_user_pings(world: World) -> None:
    """201 with the ping (the nonce given, or one made up); anonymous 401; bad nonce 422."""
    for who in (world.customer, world.mechanic, world.admin):
        r = await world.client.post(
            "/api/probe/ping", json={"nonce": f"n-{who.email}"}, headers=who.headers
        )
        assert r.status_code == 201, r.text
        ping = r.json()["ping"]
        assert set(ping) == {"id", "user_id", "nonce", "created_at"}
        assert (ping["user_id"], ping["nonce"]) == (str(who.id), f"n-{who.email}")
    r = await world.client.post("/api/probe/ping", headers=world.customer.headers)
    assert r.status_code == 201 and r.json()["ping"]["nonce"].startswith("ping-")
    r = await world.client.post("/api/probe/ping", json={}, headers=world.customer.headers)
    assert r.status_code == 201
    assert (await world.client.post("/api/probe/ping", json={"nonce": "x"})).status_code == 401
    for body in ({"nonce": ""}, {"nonce": "x" * 101}, {"nonce": "x", "table": "sessions"}):
        r = await world.client.post("/api/probe/ping", json=body, headers=world.customer.headers)
        assert r.status_code == 422, body


async def test_a_ping_reaches_its_author_only(live: LiveWorld) -> None:
    """The ping's event arrives on its author's subscription; another customer, a mechanic
    and an admin subscribed to probe_pings get nothing."""
    cara = await live.make("cara", "customer")
    olly = await live.make("olly", "customer")
    mo = await live.make("mo", "mechanic")
    ada = await live.make("ada", "admin")
    base = live.server.base
    async with (
        httpx.AsyncClient(timeout=10) as client,
        sse(client, base, cara.headers, "probe_pings") as own,
        sse(client, base, olly.headers, "probe_pings") as other,
        sse(client, base, mo.headers, "probe_pings") as mechanic,
        sse(client, base, ada.headers, "probe_pings") as admin,
    ):
        r = await client.post(
            f"{base}/api/probe/ping", json={"nonce": "hello-42"}, headers=cara.headers
        )
        assert r.status_code == 201
        data = await own.change()
        assert (data["table"], data["type"]) == ("probe_pings", "INSERT")
        assert data["record"]["nonce"] == "hello-42"
        assert data["record"]["id"] == r.json()["ping"]["id"]
        assert await other.silent(0.5)
        assert await mechanic.silent(0.1)
        assert await admin.silent(0.1)


async def test_the_page_routes_are_documented(world: World) -> None:
    """Each route the pages use is in /openapi.json with its method."""
    paths = (await world.client.get("/openapi.json")).json()["paths"]
    for path, method in (
        ("/api/sessions/{session_id}/messages", "post"),
        ("/api/sessions/{session_id}/messages", "get"),
        ("/api/alert-receipts", "post"),
        ("/api/admin/alert-health", "get"),
        ("/api/push/public-key", "get"),
        ("/api/push/subscriptions", "post"),
        ("/api/push/subscriptions", "delete"),
        ("/api/probe/ping", "post"),
    ):
        assert method in paths.get(path, {}), (path, method)
