"""`autodispatch audit`: is this database what dispatch needs, and is its data consistent?

Three areas of checks (``audit_schema`` and ``audit_data`` hold them):

- **schema**: migrations at head, the tables, every status the constraints allow against
  ``domain/lifecycle.py``, the transition table, the lifecycle and event-log triggers
  present and enabled, row-level security on every public table with exactly the
  expected policies and nothing broader, no write privileges for the API's roles;
- **data**: sessions and assignments that disagree (``CONSISTENT_PAIRS``), sessions
  without an assignment, unknown statuses, offers past their expiry, requests past their
  time to live, stale session visibility keys;
- **realtime**: the event log's head, events that never got an id, the gateways' heartbeats
  (which run, which lag, which died) and their subscribers, the Web Push cursor.

Everything is read with catalog queries and plain SQL in one read-only snapshot, so it
also runs on a database the first version wrote: a piece that is missing is a finding,
never a crash (each check runs in its own savepoint; one that fails is reported as
``check_failed`` and the others still run). Each finding names the rows involved and the
fix; ``repairable`` ones are fixed by `autodispatch repair --apply`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row
from rich.console import Console
from rich.table import Table

from autodispatch.db import queries
from autodispatch.ops import audit_data, audit_schema

ROW_LIMIT = 1000  # rows named per finding (the count is always the full one)
SHOWN_ROWS = 5  # rows a person sees per finding in the table

AREAS = ("schema", "data", "realtime")


@dataclass
class Finding:
    code: str  # stable: scripts and the runbook (docs/operations.md) key on it
    area: str  # schema | data | realtime
    message: str
    fix: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    count: int = 0  # rows involved in all (``rows`` stops at ROW_LIMIT)
    repairable: bool = False  # `autodispatch repair --apply` fixes it
    severity: str = "error"  # error: wrong now; warning: a check could not say

    def as_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "area": self.area,
            "severity": self.severity,
            "message": self.message,
            "count": max(self.count, len(self.rows)),
            "rows": [{k: _plain(v) for k, v in row.items()} for row in self.rows],
            "rows_truncated": self.count > len(self.rows),
            "fix": self.fix,
            "repairable": self.repairable,
        }


@dataclass
class AuditReport:
    findings: list[Finding] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "findings": [f.as_json() for f in self.findings],
            "facts": _plain(self.facts),
            "checks": self.checks,
        }


@dataclass(frozen=True)
class AuditOptions:
    request_ttl_seconds: int = 30 * 60
    expected_revision: str | None = None  # the code's head; None: do not compare
    row_limit: int = ROW_LIMIT
    lag_threshold_seconds: float = 30.0  # a gateway further behind than this lags
    push_lag_threshold_seconds: float = 60.0  # Web Push further behind than this lags


class Catalog:
    """What exists: tables with their columns, and functions, by schema."""

    def __init__(
        self, columns: Sequence[Mapping[str, Any]], functions: Sequence[Mapping[str, Any]]
    ):
        self.tables: dict[tuple[str, str], set[str]] = {}
        for row in columns:
            key = (row["schema_name"], row["table_name"])
            self.tables.setdefault(key, set()).add(row["column_name"])
        self.functions = {(r["schema_name"], r["function_name"]) for r in functions}

    def has_table(self, schema: str, table: str) -> bool:
        return (schema, table) in self.tables

    def missing(self, needs: Mapping[str, Sequence[str]]) -> list[str]:
        """What of ``{"schema.table": [columns]}`` (or ``{"schema.function()": []}``) is
        missing, as names."""
        gone: list[str] = []
        for name, columns in needs.items():
            schema, _, rest = name.partition(".")
            if rest.endswith("()"):
                if (schema, rest[:-2]) not in self.functions:
                    gone.append(name)
                continue
            have = self.tables.get((schema, rest))
            if have is None:
                gone.append(name)
                continue
            gone += [f"{name}.{column}" for column in columns if column not in have]
        return gone


class AuditContext:
    """What a check gets: the connection, the catalog, the options, and where to report."""

    def __init__(
        self,
        conn: psycopg.AsyncConnection[Any],
        catalog: Catalog,
        options: AuditOptions,
        report: AuditReport,
    ) -> None:
        self.conn = conn
        self.catalog = catalog
        self.options = options
        self.report = report
        self._queries = queries.load()

    async def rows(self, name: str, params: Mapping[str, Any] | None = None) -> list[DictRow]:
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(self._queries[name], params or {})
            return await cur.fetchall()

    def add(self, finding: Finding) -> None:
        self.report.findings.append(finding)

    def found(
        self,
        code: str,
        area: str,
        message: str,
        fix: str,
        rows: Sequence[Mapping[str, Any]] = (),
        *,
        count: int | None = None,
        repairable: bool = False,
        severity: str = "error",
    ) -> None:
        listed = [dict(r) for r in rows]
        for row in listed:
            row.pop("total", None)
        self.add(
            Finding(
                code=code,
                area=area,
                message=message,
                fix=fix,
                rows=listed,
                count=len(listed) if count is None else count,
                repairable=repairable,
                severity=severity,
            )
        )

    def needs(self, check: str, area: str, needs: Mapping[str, Sequence[str]]) -> bool:
        """True when everything the check reads exists; otherwise say so and skip it."""
        gone = self.catalog.missing(needs)
        if gone:
            self.found(
                "check_not_run",
                area,
                f"The {check} check could not run: {', '.join(gone)} does not exist.",
                "Bring the schema up to date (`autodispatch migrate` on a database it"
                " created); on a database the first version wrote, add what is missing by"
                " hand, then audit again.",
                [{"check": check, "missing": name} for name in gone],
                severity="warning",
            )
        return not gone


Check = Callable[[AuditContext], Awaitable[None]]


async def run_audit(
    conn: psycopg.AsyncConnection[Any], options: AuditOptions | None = None
) -> AuditReport:
    """Run every check in one read-only snapshot of the database ``conn`` is connected to."""
    options = options or AuditOptions()
    report = AuditReport()
    checks: list[tuple[str, str, Check]] = [
        *audit_schema.CHECKS,
        *audit_data.DATA_CHECKS,
        *audit_data.REALTIME_CHECKS,
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
        parts.append(f"{key}={_plain(value)}")
    return ", ".join(parts)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _plain(value: Any) -> Any:
    """JSON-ready: ids and times as strings, containers recursively."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)
