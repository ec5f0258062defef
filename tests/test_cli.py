"""The `autodispatch` command against a given DATABASE_URL, and the OpenAPI document."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
from fastapi.routing import APIRoute

from autodispatch.app import create_app
from autodispatch.db import migrate
from conftest import World, database_url, make_settings


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
    token = r.json()["paths"]["/auth/v1/token"]["post"]["responses"]
    assert "account_disabled" in token["403"]["description"]
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


async def demo_database_with_sessions(db_url: str, tmp_path: Path) -> dict[str, str]:
    """The demo accounts and a few requests through the API: one completed, one cancelled,
    one waiting for its start (accepted), one queued. Returns the waiting one's ids."""
    from autodispatch.identity.accounts import Accounts
    from autodispatch.ops.demo import DEMO_PASSWORD, ensure_demo_accounts
    from conftest import request_body

    app = create_app(make_settings(tmp_path), db_url)
    svc = app.state.services
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        await ensure_demo_accounts(svc.db, Accounts(svc.db, svc.settings))

        async def sign_in(email: str) -> dict[str, str]:
            r = await client.post(
                "/auth/v1/token?grant_type=password",
                json={"email": email, "password": DEMO_PASSWORD},
            )
            assert r.status_code == 200, r.text
            return {"Authorization": f"Bearer {r.json()['access_token']}"}

        customer = await sign_in("customer@demo.test")
        mechanic = await sign_in("mechanic@demo.test")

        async def step(path: str, headers: dict[str, str], body: Any = None) -> Any:
            r = await client.post(path, json=body, headers=headers)
            assert r.status_code in (200, 201), r.text
            return r.json()

        async def queued() -> Any:
            made = await step("/api/sessions", customer, request_body())
            return await step(f"/api/sessions/{made['session']['id']}/waiver", customer)

        async def accepted() -> Any:
            q = await queued()
            return await step(f"/api/assignments/{q['assignment']['id']}/accept", mechanic)

        done = await accepted()
        await step(f"/api/sessions/{done['session']['id']}/start", customer)
        await step(f"/api/sessions/{done['session']['id']}/end", mechanic)
        gone = await queued()
        await step(f"/api/sessions/{gone['session']['id']}/cancel", customer)
        await queued()
        waiting = await accepted()
    return {"session": waiting["session"]["id"], "assignment": waiting["assignment"]["id"]}


async def test_audit_and_repair_on_a_demo_database(db_url: str, tmp_path: Path) -> None:
    """On a clean demo database `audit` exits 0. After a session is marked completed with
    the triggers bypassed, `audit` exits 1 and names it (--json too), `repair` only says
    what it would do, `repair --apply` fixes it with an audit row, and `audit` exits 0."""
    ids = await demo_database_with_sessions(db_url, tmp_path)
    clean = autodispatch("audit", db_url=db_url, home=tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "No findings" in clean.stdout

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("set session_replication_role = replica")
        conn.execute("update sessions set status = 'completed' where id = %s", (ids["session"],))

    found = autodispatch("audit", db_url=db_url, home=tmp_path)
    assert found.returncode == 1, found.stderr
    assert "ended_session_open_assignment" in found.stdout
    assert ids["session"] in found.stdout.replace("\n", "").replace("│", "").replace(" ", "")
    as_json = autodispatch("audit", "--json", db_url=db_url, home=tmp_path)
    assert as_json.returncode == 1
    body = json.loads(as_json.stdout)
    assert body["ok"] is False
    [f] = body["findings"]
    assert f["code"] == "ended_session_open_assignment" and f["repairable"] is True
    assert f["rows"] == [
        {
            "session_id": ids["session"],
            "assignment_id": ids["assignment"],
            "session_status": "completed",
            "assignment_status": "accepted",
        }
    ]
    assert f["count"] == 1 and "repair --apply" in f["fix"]

    dry = autodispatch("repair", db_url=db_url, home=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "Dry run: nothing changed" in dry.stdout
    assert "assignment accepted → completed" in dry.stdout
    with psycopg.connect(db_url) as conn:
        status = conn.execute(
            "select status from session_assignments where id = %s", (ids["assignment"],)
        ).fetchone()
    assert status == ("accepted",)

    applied = autodispatch("repair", "--apply", "--json", db_url=db_url, home=tmp_path)
    assert applied.returncode == 0, applied.stderr
    report = json.loads(applied.stdout)
    assert (report["found"], report["remaining"]) == (1, 0)
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select entity, from_status, to_status from lifecycle_audit"
            " where session_id = %s and reason = 'repair'",
            (ids["session"],),
        ).fetchall()
    assert rows == [("assignment", "accepted", "completed")]

    again = autodispatch("audit", db_url=db_url, home=tmp_path)
    assert again.returncode == 0, again.stdout
    nothing = autodispatch("repair", "--apply", db_url=db_url, home=tmp_path)
    assert nothing.returncode == 0 and "Nothing to repair" in nothing.stdout


def test_audit_and_repair_say_when_the_database_cannot_be_read(tmp_path: Path) -> None:
    """No database at DATABASE_URL: exit 2 with the reason, not a traceback."""
    url = "postgresql://nobody@127.0.0.1:1/none"
    for command in ("audit", "repair"):
        done = autodispatch(command, db_url=url, home=tmp_path)
        assert done.returncode == 2, done.stderr
        assert f"Could not {command} the database" in done.stderr
        assert "Traceback" not in done.stderr


def test_migrate_shows_each_revision_as_it_runs(pg_server: str, tmp_path: Path) -> None:
    """Migrating an empty database names each revision with its time, then the total."""
    name = f"autodispatch_m_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    try:
        url = database_url(pg_server, name)
        done = autodispatch("migrate", db_url=url, home=tmp_path)
        assert done.returncode == 0, done.stderr
        for revision in ("upgrade  -> 0001", "upgrade 0001 -> 0002", "upgrade 0002 -> 0003"):
            assert revision in done.stderr
        assert f"Migrated the database from empty to {migrate.head()} in" in done.stderr
        again = autodispatch("migrate", db_url=url, home=tmp_path)
        assert again.returncode == 0 and "Migrated" not in again.stderr
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


def test_serve_refuses_an_unknown_log_format(tmp_path: Path) -> None:
    """A bad --log-format is a clear error before anything starts."""
    done = autodispatch(
        "serve", "--log-format", "xml", db_url="postgresql://x@127.0.0.1:1/x", home=tmp_path
    )
    assert done.returncode == 2
    assert "--log-format must be one of auto, json, console" in done.stderr
