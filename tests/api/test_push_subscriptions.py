"""Web Push subscriptions and the VAPID key: saved per mechanic, replaced, deleted, at most
ten each, never aimed at an internal address; the key generated once into the home
folder, or given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from page_helpers import Browser, b64url, b64url_decode

from autodispatch.api.push_keys import KEY_FILE, VapidKeys
from autodispatch.api.push_network import EndpointPolicy, EndpointRefused, is_public_address
from autodispatch.app import create_app
from autodispatch.config import Settings
from conftest import Account, World, make_settings

ENDPOINT = "https://push.example.net/send/abc123"
# What the tests' names resolve to (there is no DNS server to ask).
DNS = {
    "push.example.net": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
    "internal.example.net": ["10.1.2.3"],
    "half.example.net": ["93.184.215.14", "192.168.1.20"],
    "mapped.example.net": ["::ffff:127.0.0.1"],
    "nat64.example.net": ["64:ff9b::a9fe:a9fe"],  # 169.254.169.254, the metadata service
    "sixtofour.example.net": ["2002:7f00:1::1"],  # 127.0.0.1
    "shared.example.net": ["100.64.0.7"],
}


async def fake_dns(host: str, port: int) -> list[str]:
    if host not in DNS:
        raise OSError(f"{host}: Name or service not known")
    return DNS[host]


@pytest.fixture(autouse=True)
def dns(world: World) -> None:
    world.app.state.push.policy.resolve = fake_dns


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


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://127.0.0.1:5432/",
        "https://10.0.0.5/send/1",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/send/1",
        "https://[fe80::1]/send/1",
        "https://0x7f000001/send/1",
        "https://localhost/send/1",
        "https://push.localhost/send/1",
        "https://metadata/computeMetadata/v1",
        "https://internal.example.net/send/1",
        "https://half.example.net/send/1",
        "https://mapped.example.net/send/1",
        "https://nat64.example.net/send/1",
        "https://sixtofour.example.net/send/1",
        "https://shared.example.net/send/1",
        "https://nowhere.example.net/send/1",
        "https://push.example.net:99999/send/1",
    ],
)
async def test_endpoints_inside_the_network_are_refused(world: World, endpoint: str) -> None:
    """IP addresses, local names and names resolving to any private, loopback, link-local
    or shared address (also inside an IPv6 form) are 422, with one message that says
    nothing of what the name resolved to; nothing is saved."""
    r = await save(world, world.mechanic, subscription(endpoint))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_push_subscription"
    assert "public host name" in error["message"] and "10." not in error["message"]
    assert await rows(world) == []


async def test_the_table_holds_every_writer_to_a_plain_https_host(world: World) -> None:
    """The endpoint CHECK refuses user info, plain http and spaces from any writer."""
    async with await psycopg.AsyncConnection.connect(world.app.state.services.db.url) as conn:
        for endpoint in (
            "https://user@push.example.net/x",
            "https://push.example.net@10.0.0.5/x",
            "http://push.example.net/x",
            "https://push.example.net/a b",
        ):
            with pytest.raises(psycopg.errors.CheckViolation):
                await conn.execute(
                    "insert into push_subscriptions (user_id, endpoint, p256dh, auth)"
                    " values (%s, %s, 'k', 'a')",
                    (world.mechanic.id, endpoint),
                )
            await conn.rollback()


async def test_a_mechanic_keeps_at_most_ten_subscriptions(world: World) -> None:
    """Saving an eleventh subscription deletes the one least recently used; saving one
    again makes it recent; other mechanics' subscriptions are untouched."""
    other = f"{ENDPOINT}/other"
    assert (await save(world, world.other_mechanic, subscription(other))).status_code == 201
    endpoints = [f"{ENDPOINT}/{i}" for i in range(11)]
    for endpoint in endpoints[:10]:
        assert (await save(world, world.mechanic, subscription(endpoint))).status_code == 201
    assert (await save(world, world.mechanic, subscription(endpoints[0]))).status_code == 201
    assert (await save(world, world.mechanic, subscription(endpoints[10]))).status_code == 201
    kept = {endpoint for user, endpoint, _, _ in await rows(world) if user == world.mechanic.id}
    assert kept == set(endpoints) - {endpoints[1]}
    assert other in {endpoint for _, endpoint, _, _ in await rows(world)}


def test_public_addresses() -> None:
    """Only addresses on the public internet count as public."""
    for address in ("8.8.8.8", "93.184.215.14", "2606:4700::1111", "64:ff9b::808:808"):
        assert is_public_address(address), address
    for address in (
        "127.0.0.1",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.1.1",
        "240.0.0.1",
        "192.0.2.1",
        "::1",
        "::",
        "fe80::1%eth0",
        "fc00::1",
        "ff02::1",
        "::ffff:10.0.0.1",
        "64:ff9b::7f00:1",
        "2002:a00:1::1",
        "not an address",
    ):
        assert not is_public_address(address), address


async def test_allowed_hosts_are_a_setting_and_skip_the_address_rule() -> None:
    """AUTODISPATCH_PUSH_ALLOWED_HOSTS lists hosts (names or addresses) the sender may
    reach although they are not public; the others still have to be."""
    settings = Settings.from_env(
        {"AUTODISPATCH_PUSH_ALLOWED_HOSTS": " push.internal , 10.0.0.5,"}, home=Path("/tmp")
    )
    assert settings.push_allowed_hosts == ("push.internal", "10.0.0.5")
    assert Settings.from_env({}, home=Path("/tmp")).push_allowed_hosts == ()
    policy = EndpointPolicy(settings.push_allowed_hosts, resolve=fake_dns)
    await policy.check_endpoint("https://10.0.0.5:8443/push/1")
    await policy.check_endpoint("https://PUSH.internal./push/1")
    await policy.check_endpoint("https://push.example.net/push/1")
    with pytest.raises(EndpointRefused):
        await policy.check_endpoint("https://10.0.0.6/push/1")
    with pytest.raises(EndpointRefused):
        await policy.check_endpoint("https://internal.example.net/push/1")
