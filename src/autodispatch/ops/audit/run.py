"""Run every audit check in one read-only snapshot, and render the report for people."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.rows import dict_row
from rich.console import Console
from rich.table import Table

from autodispatch.db import queries
from autodispatch.ops.audit import data, schema
from autodispatch.ops.audit.context import (
    AREAS,
    ROW_LIMIT,
    SHOWN_ROWS,
    AuditContext,
    AuditOptions,
    AuditReport,
    Catalog,
    Check,
    plain,
)


async def run_audit(
    conn: psycopg.AsyncConnection[Any], options: AuditOptions | None = None
) -> AuditReport:
    """Run every check in one read-only snapshot of the database ``conn`` is connected to."""
    options = options or AuditOptions()
    report = AuditReport()
    checks: list[tuple[str, str, Check]] = [
        *schema.CHECKS,
        *data.DATA_CHECKS,
        *data.REALTIME_CHECKS,
    ]
    async with conn.transaction():
        await conn.execute("set transaction isolation level repeatable read, read only")
        async with conn.cursor(row_factory=dict_row) as cur:
            q = queries.load()
            await cur.execute(q["audit_columns"])
            columns = await cur.fetchall()
            await cur.execute(q["audit_functions"])
            functions = await cur.fetchall()
        ctx = AuditContext(conn, Catalog(columns, functions), options, report)
        for name, area, check in checks:
            report.checks.append(name)
            try:
                async with conn.transaction():  # a savepoint: one failure spoils nothing else
                    await check(ctx)
            except psycopg.Error as exc:
                ctx.found(
                    "check_failed",
                    area,
                    f"The {name} check failed: {exc.__class__.__name__}: {exc}".strip(),
                    "Read the error: usually a piece of the schema that differs from what"
                    " this code expects. Fix it, then audit again.",
                    [{"check": name, "error": str(exc).strip()}],
                    severity="warning",
                )
    return report


def render(report: AuditReport, console: Console) -> None:
    """The report for people: one table of findings, then the realtime facts."""
    if report.ok:
        console.print(f"[green]No findings[/green] ({len(report.checks)} checks).")
    else:
        table = Table(title=f"{len(report.findings)} findings", show_lines=True, expand=True)
        table.add_column("area", no_wrap=True)
        table.add_column("finding", ratio=3)
        table.add_column("rows", ratio=3, overflow="fold")
        table.add_column("fix", ratio=3)
        for f in sorted(report.findings, key=lambda f: AREAS.index(f.area)):
            shown = [_describe_row(row) for row in f.rows[:SHOWN_ROWS]]
            more = max(f.count, len(f.rows)) - len(shown)
            if more > 0:
                shown.append(f"… and {more} more (--json lists up to {ROW_LIMIT})")
            severity = "red" if f.severity == "error" else "yellow"
            table.add_row(
                f.area,
                f"[{severity}]{f.code}[/{severity}]\n{f.message}",
                "\n".join(shown),
                f.fix + ("\n[dim](repairable)[/dim]" if f.repairable else ""),
            )
        console.print(table)
    facts = report.facts
    stream = facts.get("event_log")
    if stream:
        console.print(
            f"Event log: last id {stream['last_id']}, pruned through"
            f" {stream['pruned_through']}, newest event {_age(stream.get('newest_age_seconds'))}."
        )
    gateways = facts.get("gateways")
    if gateways is not None:
        live = [g for g in gateways if g["live"]]
        console.print(
            f"Gateways: {len(live)} live, {len(gateways) - len(live)} stopped;"
            f" {facts.get('subscribers', 0)} subscribers."
        )
        for g in gateways:
            state = "live" if g["live"] else f"silent {_age(g['silent_seconds'])}"
            console.print(
                f"  {g['host']}:{g['pid']} ({g['id']}) {state}; position {g['position']},"
                f" {g['behind']} behind, lag {g['lag_seconds']:.1f} s,"
                f" {g['subscribers']} subscribers",
                highlight=False,
            )
    push = facts.get("push_cursor")
    if push:
        console.print(
            f"Web Push: sent through event {push['push_position']}, {push['behind']} behind"
            f" the log"
            + (f" (oldest unsent {_age(push['lag_seconds'])})." if push["behind"] else ".")
        )
    oldest = facts.get("oldest_undelivered_event")
    if oldest:
        console.print(
            f"Oldest event not yet routed by every live gateway: {oldest['id']}"
            f" ({_age(oldest['age_seconds'])})."
        )


def _describe_row(row: Mapping[str, Any]) -> str:
    parts = []
    for key, value in row.items():
        parts.append(f"{key}={plain(value)}")
    return ", ".join(parts)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"
