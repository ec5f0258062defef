"""Sign-up, sign-in, refresh and throttling, in the shapes supabase-js expects."""

from __future__ import annotations

import jwt

from conftest import SECRET, World


async def test_signup_then_password_grant(world: World) -> None:
    """Sign-up creates a customer and answers like GoTrue; the password grant signs in again."""
    r = await world.client.post(
        "/auth/v1/signup",
        json={
            "email": "New.Person@Example.com ",
            "password": "long-enough",
            "data": {"name": "Nia"},
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "bearer" and body["expires_in"] > 0 and body["refresh_token"]
    assert body["user"]["email"] == "new.person@example.com"
    assert body["user"]["app_metadata"]["account_type"] == "customer"
    claims = jwt.decode(
        body["access_token"], SECRET, algorithms=["HS256"], audience="authenticated"
    )
    assert claims["sub"] == body["user"]["id"] and claims["role"] == "authenticated"
    assert claims["exp"] > claims["iat"]
    r = await world.client.post(
        "/auth/v1/token?grant_type=password",
        json={"email": "new.person@example.com", "password": "long-enough"},
    )
    assert r.status_code == 200 and r.json()["user"]["id"] == body["user"]["id"]
    r = await world.client.get(
        "/auth/v1/user", headers={"Authorization": f"Bearer {r.json()['access_token']}"}
    )
    assert r.status_code == 200 and r.json()["email"] == "new.person@example.com"


async def test_signup_refuses_duplicates_and_weak_passwords(world: World) -> None:
    """A taken email is a 409, a short password or bad email a 422."""
    r = await world.client.post(
        "/auth/v1/signup", json={"email": world.customer.email, "password": "long-enough"}
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "email_taken"
    r = await world.client.post(
        "/auth/v1/signup", json={"email": "a@b.example", "password": "short"}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "weak_password"
    r = await world.client.post(
        "/auth/v1/signup", json={"email": "nope", "password": "long-enough"}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_email"


async def test_refresh_token_rotates(world: World) -> None:
    """A refresh token gives new tokens once; using it twice fails."""
    r = await world.client.post(
        "/auth/v1/token?grant_type=password",
        json={"email": world.customer.email, "password": "password-123"},
    )
    refresh = r.json()["refresh_token"]
    r = await world.client.post(
        "/auth/v1/token?grant_type=refresh_token", json={"refresh_token": refresh}
    )
    assert r.status_code == 200 and r.json()["refresh_token"] != refresh
    r = await world.client.post(
        "/auth/v1/token?grant_type=refresh_token", json={"refresh_token": refresh}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_refresh_token"


async def test_wrong_password_is_refused_then_throttled(world: World) -> None:
    """Five wrong passwords for one account, then even the right one gets 429 with Retry-After."""
    for _ in range(5):
        r = await world.client.post(
            "/auth/v1/token?grant_type=password",
            json={"email": world.mechanic.email, "password": "wrong-password"},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_credentials"
    r = await world.client.post(
        "/auth/v1/token?grant_type=password",
        json={"email": world.mechanic.email, "password": "password-123"},
    )
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "sign_in_throttled"
    assert 0 < int(r.headers["retry-after"]) <= 15 * 60
    # Another account from the same address is not locked by that account's failures.
    r = await world.client.post(
        "/auth/v1/token?grant_type=password",
        json={"email": world.customer.email, "password": "password-123"},
    )
    assert r.status_code == 200


async def test_unknown_email_answers_like_a_wrong_password(world: World) -> None:
    """An unknown email gets the same error as a wrong password (no account discovery)."""
    r = await world.client.post(
        "/auth/v1/token?grant_type=password",
        json={"email": "nobody@test.example", "password": "password-123"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_credentials"


async def test_unknown_grant_type_is_refused(world: World) -> None:
    """grant_type must be password or refresh_token."""
    r = await world.client.post("/auth/v1/token?grant_type=magic", json={})
    assert r.status_code == 422


async def test_public_config_has_an_anon_key_that_verifies(world: World) -> None:
    """/api/config hands out an anon JWT signed with our secret, role anon."""
    r = await world.client.get("/api/config")
    claims = jwt.decode(r.json()["anon_key"], SECRET, algorithms=["HS256"])
    assert claims["role"] == "anon" and claims["exp"] > claims["iat"]
    r = await world.client.get(
        "/api/workshops", headers={"Authorization": f"Bearer {r.json()['anon_key']}"}
    )
    assert r.status_code == 200
    assert {w["name"] for w in r.json()["items"]} == {"North Garage", "South Garage"}
