"""Web Push subscriptions and the VAPID key: saved per mechanic, replaced, deleted; the key
generated once into the home folder, or given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import psycopg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from page_helpers import Browser, b64url, b64url_decode

from autodispatch.api.push_sender import KEY_FILE, VapidKeys
from autodispatch.app import create_app
from conftest import Account, World, make_settings

ENDPOINT = "https://push.example.net/send/abc123"


def subscription(endpoint: str = ENDPOINT, browser: Browser | None = None) -> dict[str, Any]:
    """What `PushSubscription.toJSON()` gives."""
    browser = browser or Browser()
    return {
        "endpoint": endpoint,
        "expirationTime": None,
        "keys": {"p256dh": browser.p256dh, "auth": browser.auth},
    }


async def rows(world: World) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        cur = await conn.execute(
            "select user_id, endpoint, p256dh, auth from push_subscriptions order by created_at"
        )
        return await cur.fetchall()


async def save(world: World, who: Account, body: Any) -> httpx.Response:
    return await world.client.post("/api/push/subscriptions", json=body, headers=who.headers)


async def test_public_key_is_made_once_into_the_home_folder(world: World, tmp_path: Path) -> None:
    """GET /api/push/public-key is the uncompressed P-256 point of the key kept (0600) in
    the home folder; a restart with the same home keeps it; a given key wins."""
    r = await world.client.get("/api/push/public-key")
    assert r.status_code == 200
    public_key = r.json()["public_key"]
    point = b64url_decode(public_key)
    assert len(point) == 65 and point[0] == 4 and "=" not in public_key
    path = tmp_path / KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    own = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert own == point
    assert VapidKeys.load(make_settings(tmp_path)).public_key == public_key

    given = ec.generate_private_key(ec.SECP256R1())
    raw = b64url(given.private_numbers().private_value.to_bytes(32, "big"))
    app = create_app(make_settings(tmp_path, vapid_private_key=raw), "postgresql://unused/db")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        r = await client.get("/api/push/public-key")
    assert b64url_decode(r.json()["public_key"]) == given.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


async def test_a_mechanic_saves_replaces_and_deletes_a_subscription(world: World) -> None:
    """201 with the subscription; the same endpoint again replaces its keys (one row); another
    mechanic saving it takes it over; DELETE by its owner is 204, then 404."""
    first = Browser()
    r = await save(world, world.mechanic, subscription(browser=first))
    assert r.status_code == 201, r.text
    saved = r.json()["subscription"]
    assert set(saved) == {"id", "endpoint", "created_at"} and saved["endpoint"] == ENDPOINT
    assert await rows(world) == [(world.mechanic.id, ENDPOINT, first.p256dh, first.auth)]

    second = Browser()
    r = await save(world, world.mechanic, subscription(browser=second))
    assert r.status_code == 201 and r.json()["subscription"]["id"] == saved["id"]
    assert await rows(world) == [(world.mechanic.id, ENDPOINT, second.p256dh, second.auth)]

    other = "https://push.example.net/send/other"
    assert (await save(world, world.mechanic, subscription(other))).status_code == 201
    assert len(await rows(world)) == 2

    r = await save(world, world.workshop_mechanic, subscription(browser=second))
    assert r.status_code == 201
    owners = {endpoint: user for user, endpoint, _, _ in await rows(world)}
    assert owners == {ENDPOINT: world.workshop_mechanic.id, other: world.mechanic.id}

    r = await world.client.request(
        "DELETE",
        "/api/push/subscriptions",
        json={"endpoint": ENDPOINT},
        headers=world.mechanic.headers,
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "push_subscription_not_found"
    assert len(await rows(world)) == 2
    r = await world.client.request(
        "DELETE",
        "/api/push/subscriptions",
        json={"endpoint": ENDPOINT},
        headers=world.workshop_mechanic.headers,
    )
    assert r.status_code == 204 and r.content == b""
    assert [endpoint for _, endpoint, _, _ in await rows(world)] == [other]
    r = await world.client.request(
        "DELETE",
        "/api/push/subscriptions",
        json={"endpoint": ENDPOINT},
        headers=world.workshop_mechanic.headers,
    )
    assert r.status_code == 404


async def test_only_mechanics_subscribe(world: World) -> None:
    """Customers and admins get 403 wrong_role, anonymous callers 401; nothing is saved."""
    for who in (world.customer, world.admin):
        r = await save(world, who, subscription())
        assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_role"
    r = await world.client.post("/api/push/subscriptions", json=subscription())
    assert r.status_code == 401
    r = await world.client.request("DELETE", "/api/push/subscriptions", json={"endpoint": ENDPOINT})
    assert r.status_code == 401
    assert await rows(world) == []


async def test_bad_subscriptions_are_refused_and_change_nothing(world: World) -> None:
    """Plain http, a URL with credentials, keys that are not a P-256 point and a 16-byte
    secret, missing or unknown fields: 422."""
    good = subscription()
    bad_bodies: list[Any] = [
        {**good, "endpoint": "http://push.example.net/send/1"},
        {**good, "endpoint": "https://user:pw@push.example.net/send/1"},
        {**good, "endpoint": "push.example.net/send/1"},
        {**good, "keys": {"p256dh": b64url(b"\x04" + b"x" * 10), "auth": good["keys"]["auth"]}},
        {**good, "keys": {"p256dh": "%%%", "auth": good["keys"]["auth"]}},
        {**good, "keys": {"p256dh": good["keys"]["p256dh"], "auth": b64url(b"short")}},
        {**good, "keys": {"p256dh": good["keys"]["p256dh"]}},
        {"endpoint": ENDPOINT},
        {**good, "user_id": str(world.customer.id)},
    ]
    for body in bad_bodies:
        r = await save(world, world.mechanic, body)
        assert r.status_code == 422, (body, r.text)
    assert await rows(world) == []
