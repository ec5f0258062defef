"""What an operator runs against a database in use: audit, repair, probe, explain-delivery."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Annotated

import psycopg
import typer
from rich.console import Console

from autodispatch.cli.app import (
    database,
    err,
    out,
)
from autodispatch.config import Settings
from autodispatch.db import migrate as migrations


def explain_delivery_command(
    event: Annotated[int, typer.Option(help="Event id (the SSE id / data.event_id)")],
    user: Annotated[str, typer.Option(help="Email of the user")],
    event_type: Annotated[
        str, typer.Option("--event-type", help="Subscribed event: * or INSERT, UPDATE, DELETE")
    ] = "*",
    row_filter: Annotated[
        str | None, typer.Option("--filter", help="Subscription filter, e.g. status=eq.queued")
    ] = None,
) -> None:
    """Say whether a user gets an event, and which visibility key or filter decides it.

    Exit code 0: delivered; 1: not delivered (or no such event/user)."""
    from autodispatch.db.database import Database
    from autodispatch.realtime.explain import explain_delivery

    settings = Settings.from_env()

    async def go(url: str) -> tuple[bool, str]:
        db = Database(url, min_size=1, max_size=2)
        await db.open()
        try:
            found = await explain_delivery(
                db, event, user, event_filter=event_type, row_filter=row_filter
            )
            return found.delivered, found.text
        finally:
            await db.close()

    with database(settings) as url:
        delivered, text = asyncio.run(go(url))
    out.print(text, highlight=False)
    if not delivered:
        raise typer.Exit(1)


def probe(
    email: Annotated[str, typer.Option(help="The account to probe as")],
    password: Annotated[str, typer.Option(help="Its password")],
    url: Annotated[str, typer.Option(help="The server's base URL")] = "http://127.0.0.1:8000",
    row_filter: Annotated[
        str | None,
        typer.Option("--filter", help="Subscribe with this filter, e.g. nonce=eq.x"),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait at each step")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
    explain: Annotated[
        bool,
        typer.Option(help="When the event does not come, ask the database why"),
    ] = True,
) -> None:
    """Check delivery end to end as one user: sign in, connect, subscribe, cause a harmless
    change that user may see, and time its event. Names the step that fails.

    Exit code 0: the event arrived; 1: a step failed."""
    from rich.table import Table

    from autodispatch.ops.probe import run_probe

    result = asyncio.run(run_probe(url, email, password, row_filter=row_filter, timeout=timeout))
    why: str | None = None
    failed = result.failed
    if failed is not None and failed.name == "delivery" and result.ping_id and explain:
        why = _explain_probe(result.ping_id, email, row_filter)
    if as_json:
        body = result.as_json()
        body["explanation"] = why
        out.print_json(data=body)
    else:
        table = Table(title=f"probe as {email}")
        for column in ("step", "result", "ms", "detail"):
            table.add_column(column)
        for step in result.steps:
            mark = "[green]ok[/green]" if step.ok else "[red]FAILED[/red]"
            table.add_row(step.name, mark, f"{step.ms:.1f}", step.detail)
        out.print(table)
        if result.ok:
            out.print(
                f"Delivered: {result.latency_ms} ms from request to event"
                f" ({result.commit_to_receive_ms} ms from commit)."
            )
        elif failed is not None:
            out.print(f"[red]The probe failed at {failed.name}:[/red] {failed.detail}")
        if why:
            out.print(why, highlight=False)
    if not result.ok:
        raise typer.Exit(1)


def _explain_probe(ping_id: str, email: str, row_filter: str | None) -> str:
    """Why the probe's event did not reach it, from the event log (needs the database)."""
    from autodispatch.db.database import Database
    from autodispatch.ops.probe import explain_missing
    from autodispatch.realtime.explain import explain_delivery

    async def go(db_url: str) -> str:
        db = Database(db_url, min_size=1, max_size=2)
        await db.open()
        try:
            event_id = None
            for _ in range(10):  # the change committed; its event id is set at commit
                event_id = await explain_missing(db, ping_id)
                if event_id is not None:
                    break
                await asyncio.sleep(0.2)
            if event_id is None:
                return (
                    f"No event was logged for probe ping {ping_id}:"
                    " is the capture trigger on probe_pings missing?"
                )
            found = await explain_delivery(db, event_id, email, row_filter=row_filter)
            return found.text
        finally:
            await db.close()

    settings = Settings.from_env()
    try:
        with database(settings) as db_url:
            return asyncio.run(go(db_url))
    except (OSError, psycopg.Error) as exc:
        return f"Could not read the event log to explain why ({exc})."


def audit(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")] = False,
) -> None:
    """Check the schema, the data and realtime delivery of the database in use.

    Works on any database with the dispatch tables (a missing piece is a finding). Each
    finding names its rows and its fix; `repair --apply` fixes the repairable ones.
    Exit code 0: nothing found; 1: findings; 2: the database could not be read."""
    from autodispatch.ops.audit.context import AuditOptions, AuditReport
    from autodispatch.ops.audit.run import render, run_audit

    settings = Settings.from_env()
    options = AuditOptions(
        request_ttl_seconds=settings.request_ttl_seconds, expected_revision=migrations.head()
    )

    async def go(url: str) -> AuditReport:
        async with await psycopg.AsyncConnection.connect(url, connect_timeout=10) as conn:
            return await run_audit(conn, options)

    with database(settings) as url:
        try:
            report = asyncio.run(go(url))
        except psycopg.Error as exc:
            err.print(f"[red]Could not audit the database:[/red] {exc}")
            raise typer.Exit(2) from None
    if as_json:
        sys.stdout.write(json.dumps(report.as_json(), indent=2) + "\n")
    else:
        render(report, out if out.is_terminal else Console(width=160))
    if not report.ok:
        raise typer.Exit(1)


def repair(
    apply: Annotated[
        bool, typer.Option("--apply", help="Make the changes (without it: only say what they are)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")] = False,
) -> None:
    """Fix the data findings of `audit`: sessions and assignments that disagree, sessions
    without an assignment, offers and requests past their time, stale visibility keys,
    events without an id, gateways that died. A dry run unless --apply; each change
    writes a lifecycle_audit row with the reason 'repair'; running it again changes nothing.

    Exit code 0: nothing left to repair (or a dry run); 1: rows were left alone or the
    repair was refused; 2: the database could not be read."""
    from autodispatch.cli.progress import Bars
    from autodispatch.ops.repair import RepairOptions, RepairRefused, RepairReport, render
    from autodispatch.ops.repair import repair as run_repair

    settings = Settings.from_env()
    options = RepairOptions(apply=apply, request_ttl_seconds=settings.request_ttl_seconds)

    async def go(url: str, bars: Bars) -> RepairReport:
        async with await psycopg.AsyncConnection.connect(url, connect_timeout=10) as conn:
            return await run_repair(conn, options, bars)

    with database(settings) as url, Bars(err) as bars:
        try:
            report = asyncio.run(go(url, bars))
        except RepairRefused as exc:
            err.print(f"[red]Nothing repaired:[/red] {exc}")
            raise typer.Exit(1) from None
        except psycopg.Error as exc:
            err.print(f"[red]Could not repair the database:[/red] {exc}")
            raise typer.Exit(2) from None
    if as_json:
        sys.stdout.write(json.dumps(report.as_json(), indent=2) + "\n")
    else:
        render(report, out if out.is_terminal else Console(width=160))
    if apply and report.remaining:
        raise typer.Exit(1)
