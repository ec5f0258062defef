"""Helpers for the operations tests: a marketplace with every kind of session, changes made
behind the code's back, and the audit and repair run on a database URL."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg

from autodispatch.app import create_app
from autodispatch.db import migrate
from autodispatch.ops.audit.context import AuditOptions, AuditReport
from autodispatch.ops.audit.run import run_audit
from autodispatch.ops.repair import RepairOptions, RepairReport, repair
from conftest import Account, World, make_settings


class AgainWorld(World):
    """A World whose accounts may already exist (a second app on the same database)."""

    async def account(
        self, email: str, account_type: str, name: str, workshop: str | None = None
    ) -> Account:
        with psycopg.connect(self.app.state.services.db.url) as conn:
            row = conn.execute(
                "select u.id, m.id, m.workshop_id from auth.users u"
                " left join mechanics m on m.user_id = u.id where u.email = %s",
                (email,),
            ).fetchone()
        if row is None:
            return await super().account(email, account_type, name, workshop)
        token, _ = self.app.state.services.accounts.tokens.access_token(
            user_id=row[0], email=email, account_type=account_type, name=name
        )
        return Account(row[0], email, token, account_type, row[1], row[2])


@contextlib.asynccontextmanager
async def running_world(db_url: str, tmp_path: Path, **overrides: Any) -> AsyncIterator[World]:
    """The app (with its background tasks) and the standard accounts, until the block ends."""
    app = create_app(make_settings(tmp_path, **overrides), db_url)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        world = AgainWorld(app, client, *([None] * 9))  # type: ignore[arg-type]
        await world.populate()
        yield world


async def post(world: World, path: str, headers: dict[str, str], body: Any = None) -> Any:
    r = await world.client.post(path, json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def every_kind_of_session(world: World) -> dict[str, dict[str, Any]]:
    """Sessions in every state the API can reach, each made through the API."""
    made: dict[str, dict[str, Any]] = {}
    made["pending_waiver"] = await world.request()
    made["paid_unpaid"] = await world.request(type="paid")
    made["queued"] = await world.queued()
    made["workshop_queued"] = await world.queued(
        world.other_customer, workshop_id=world.workshop_id
    )

    offered = await world.queued()
    made["offered"] = await post(
        world,
        f"/api/assignments/{offered['assignment']['id']}/offer",
        world.admin.headers,
        {"mechanic_id": str(world.mechanic.mechanic_id), "ttl_seconds": 600},
    )
    declined = await world.queued()
    await post(
        world,
        f"/api/assignments/{declined['assignment']['id']}/offer",
        world.admin.headers,
        {"mechanic_id": str(world.mechanic.mechanic_id), "ttl_seconds": 600},
    )
    made["declined"] = await post(
        world, f"/api/assignments/{declined['assignment']['id']}/decline", world.mechanic.headers
    )

    async def accepted() -> dict[str, Any]:
        q = await world.queued()
        return await post(
            world, f"/api/assignments/{q['assignment']['id']}/accept", world.mechanic.headers
        )

    made["waiting"] = await accepted()
    live = await accepted()
    made["live"] = await post(
        world, f"/api/sessions/{live['session']['id']}/start", world.customer.headers
    )
    done = await accepted()
    await post(world, f"/api/sessions/{done['session']['id']}/start", world.mechanic.headers)
    made["completed"] = await post(
        world, f"/api/sessions/{done['session']['id']}/end", world.mechanic.headers
    )
    cancelled_waiting = await accepted()
    made["cancelled_waiting"] = await post(
        world,
        f"/api/sessions/{cancelled_waiting['session']['id']}/cancel",
        world.customer.headers,
    )
    queued = await world.queued()
    made["cancelled_queued"] = await post(
        world, f"/api/sessions/{queued['session']['id']}/cancel", world.customer.headers
    )
    paid = await world.request(type="paid")
    await post(world, f"/api/sessions/{paid['session']['id']}/waiver", world.customer.headers)
    made["paid_queued"] = await post(
        world, f"/api/dev/sessions/{paid['session']['id']}/confirm-payment", world.customer.headers
    )
    return made


def behind_our_back(db_url: str, *statements: str, params: Any = None) -> None:
    """Run statements with every trigger bypassed, as a careless script would (superuser)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("set session_replication_role = replica")
        for statement in statements:
            conn.execute(statement, params)  # type: ignore[arg-type]


def sql(db_url: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """One statement as the owner, triggers on; its rows (if any). The events it wrote are
    numbered right after, as the writing process's sequencer would (db/sequencer.py)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        cur = conn.execute(statement, params)  # type: ignore[arg-type]
        rows = cur.fetchall() if cur.description else []
        with contextlib.suppress(psycopg.Error):  # a damaged or first-version schema
            conn.execute("select realtime.sequence(100000)")
        return rows


async def audit(db_url: str, **options: Any) -> AuditReport:
    opts = AuditOptions(expected_revision=migrate.head(), **options)
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        return await run_audit(conn, opts)


async def run_repair(db_url: str, *, apply: bool = True, **options: Any) -> RepairReport:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        return await repair(conn, RepairOptions(apply=apply, **options))


def finding(report: AuditReport, code: str) -> Any:
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, (code, [f.as_json() for f in report.findings])
    return found[0]


def repair_audit_rows(db_url: str, session_id: Any) -> list[tuple[Any, ...]]:
    return sql(
        db_url,
        "select entity, from_status, to_status from lifecycle_audit"
        " where session_id = %s and reason = 'repair' order by id",
        (session_id,),
    )
