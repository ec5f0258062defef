"""The `autodispatch` command against a given DATABASE_URL, and the OpenAPI document."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from fastapi.routing import APIRoute

from autodispatch.app import create_app
from autodispatch.db import migrate
from conftest import World, make_settings


def autodispatch(
    *args: str, db_url: str, home: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": db_url, "AUTODISPATCH_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "autodispatch", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_create_user_makes_a_workshop_mechanic_who_can_sign_in(
    db_url: str, tmp_path: Path
) -> None:
    """create-user with --workshop creates the workshop and a mechanic who signs in and queues."""
    done = autodispatch(
        "create-user",
        "--email",
        "Jo@Garage.example",
        "--role",
        "mechanic",
        "--name",
        "Jo Garage",
        "--workshop",
        "Jo's Garage",
        "--password",
        "secret-password",
        db_url=db_url,
        home=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "Created mechanic jo@garage.example" in done.stdout
    again = autodispatch(
        "create-user",
        "--email",
        "jo@garage.example",
        "--password",
        "secret-password",
        db_url=db_url,
        home=tmp_path,
    )
    assert again.returncode == 1 and "already exists" in again.stderr
    weak = autodispatch(
        "create-user",
        "--email",
        "x@garage.example",
        "--password",
        "short",
        db_url=db_url,
        home=tmp_path,
    )
    assert weak.returncode == 1 and "8 to 128" in weak.stderr
    app = create_app(make_settings(tmp_path), db_url)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        r = await client.post(
            "/auth/v1/token?grant_type=password",
            json={"email": "jo@garage.example", "password": "secret-password"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["user"]["app_metadata"]["account_type"] == "mechanic"
        r = await client.get("/api/workshops")
        assert [w["name"] for w in r.json()["items"]] == ["Jo's Garage"]


def test_migrate_and_db_url_use_database_url(db_url: str, tmp_path: Path) -> None:
    """With DATABASE_URL, migrate reports the head revision and db-url prints that URL."""
    done = autodispatch("migrate", db_url=db_url, home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"revision {migrate.head()}" in done.stdout
    done = autodispatch("db-url", db_url=db_url, home=tmp_path)
    assert done.stdout.strip() == db_url


async def test_openapi_document_matches_the_routes(world: World) -> None:
    """Every API route is in /openapi.json with its methods, and nothing else is."""
    r = await world.client.get("/openapi.json")
    assert r.status_code == 200
    documented = {
        (path, method.upper()) for path, ops in r.json()["paths"].items() for method in ops
    }

    def api_routes(routes: list[Any]) -> list[APIRoute]:
        found: list[APIRoute] = []
        for route in routes:
            if isinstance(route, APIRoute):
                found.append(route)
            elif hasattr(route, "original_router"):  # FastAPI's included router wrapper
                found += api_routes(route.original_router.routes)
        return found

    routes = {
        (route.path, method)
        for route in api_routes(world.app.routes)
        if route.include_in_schema
        for method in route.methods
    }
    assert len(routes) > 15
    assert documented == routes
    for path in (
        "/auth/v1/token",
        "/auth/v1/signup",
        "/api/sessions",
        "/api/sessions/{session_id}/waiver",
        "/api/mechanic/queue",
        "/api/assignments/{assignment_id}/accept",
        "/api/feature-flags/{key}",
        "/api/workshops",
        "/healthz",
        "/api/config",
    ):
        assert path in r.json()["paths"], path
