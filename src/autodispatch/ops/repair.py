"""`autodispatch repair`: fix the data findings of `audit`, each change with an audit row.

A dry run by default: it lists what it would change. With ``apply`` it makes the changes,
in short transactions of at most ``batch`` rows, each row re-read and locked before it
is changed, so it is idempotent and safe while servers run: a row that changed meanwhile
is left alone, a second run finds nothing.

Every status a repair moves is written to ``lifecycle_audit`` by the audit trigger with
the reason ``repair``; a repair that moves no status (visibility keys) writes that row
itself. Moves the lifecycle allows (an offer back to the queue, a request expiring) go
through the guard like any other writer. Making a disagreeing pair agree often needs a
move the guard refuses (``queued → completed``), and the sync triggers would fight it;
for those the repair disables the guard and sync triggers *inside its own transaction*,
once it holds the rows it changes and both tables locked against writers
(docs/decisions.md, Repair). Capture and audit triggers stay on: subscribers hear of
every repaired row, and the audit sees it. A row a writer holds is left alone (run the
repair again); the repair never makes a writer wait for more than one small batch, and
never takes part in a deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from autodispatch.ops.audit.context import Catalog
from autodispatch.ops.repair_kinds import Repairs
from autodispatch.ops.repair_work import (
    AUDIT_TRIGGERS,
    SAMPLE,
    KindResult,
    Progress,
    Repairer,
    RepairOptions,
    RepairRefused,
)

__all__ = ["RepairOptions", "RepairRefused", "RepairReport", "render", "repair"]


@dataclass
class RepairReport:
    applied: bool
    kinds: list[KindResult] = field(default_factory=list)

    @property
    def found(self) -> int:
        return sum(k.found for k in self.kinds)

    @property
    def remaining(self) -> int:
        """Rows found and not fixed (all of them in a dry run)."""
        return sum(k.found - k.fixed for k in self.kinds)

    def as_json(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "found": self.found,
            "remaining": self.remaining,
            "kinds": [k.as_json() for k in self.kinds],
        }


# (code, title, method, what it reads): in this order, each kind sees the work of the ones before.
KINDS: list[tuple[str, str, str, dict[str, list[str]]]] = [
    (
        "session_without_assignment",
        "sessions without an assignment",
        "sessions_without_assignment",
        {
            "public.sessions": [
                "id",
                "status",
                "mechanic_id",
                "type",
                "customer_id",
                "workshop_id",
            ],
            "public.session_assignments": ["session_id", "status", "request_summary"],
            "public.waivers": ["session_id"],
            "public.payments": ["session_id", "status"],
            "public.build_request_summary()": [],
        },
    ),
    (
        "inconsistent_pair",
        "sessions and assignments that disagree",
        "pairs",
        {
            "public.sessions": ["id", "status", "mechanic_id", "ended_at", "updated_at"],
            "public.session_assignments": [
                "id",
                "session_id",
                "status",
                "mechanic_id",
                "mechanic_name",
                "offered_to",
                "offer_expires_at",
                "accepted_at",
                "ended_at",
                "updated_at",
            ],
        },
    ),
    (
        "request_past_ttl",
        "requests past their time to live",
        "requests_past_ttl",
        {"public.session_assignments": ["id", "session_id", "status", "queued_at", "ended_at"]},
    ),
    (
        "offer_past_expiry",
        "offers past their expiry",
        "offers_past_expiry",
        {
            "public.session_assignments": [
                "id",
                "session_id",
                "status",
                "offer_expires_at",
                "offered_to",
            ]
        },
    ),
    (
        "stale_session_keys",
        "sessions with stale visibility keys",
        "stale_session_keys",
        {
            "public.sessions": ["id", "visibility_keys"],
            "public.assignment_visibility_keys()": [],
        },
    ),
    (
        "event_without_id",
        "events no server gave an id",
        "events_without_id",
        {
            "realtime.events": ["seq", "id", "table_name", "row_id", "type", "at"],
            "realtime.sequence()": [],
        },
    ),
    (
        "gateway_stopped",
        "gateways that stopped without shutting down",
        "stopped_gateways",
        {
            "realtime.gateways": ["id", "seen_at", "heartbeat_seconds"],
            "realtime.gateway_is_live()": [],
        },
    ),
]


async def repair(
    conn: psycopg.AsyncConnection[Any],
    options: RepairOptions | None = None,
    progress: Progress | None = None,
) -> RepairReport:
    """Find (and with ``options.apply``, fix) every kind of data finding ``audit`` reports
    as repairable. ``conn`` is switched to autocommit: each batch is its own transaction."""
    options = options or RepairOptions()
    await conn.set_autocommit(True)
    worker = Repairs(conn, options, progress)
    catalog = Catalog(await worker.rows("audit_columns"), await worker.rows("audit_functions"))
    if options.apply:
        await _check_audit_triggers(worker, catalog)
    report = RepairReport(applied=options.apply)
    for code, title, method, needs in KINDS:
        result = KindResult(code, title)
        report.kinds.append(result)
        missing = catalog.missing(needs)
        if missing:
            result.skipped.append(f"cannot run here: {', '.join(missing)} does not exist")
            continue
        await getattr(worker, method)(result)
    return report


async def _check_audit_triggers(worker: Repairer, catalog: Catalog) -> None:
    if catalog.missing({"public.lifecycle_audit": ["reason"]}):
        raise RepairRefused(
            "public.lifecycle_audit does not exist: a repair must leave an audit row for each"
            " change. Run `autodispatch migrate` first."
        )
    off = set(AUDIT_TRIGGERS) - set(await worker.enabled_triggers(AUDIT_TRIGGERS))
    if off:
        names = ", ".join(f"{t}.{n}" for t, n in sorted(off))
        raise RepairRefused(
            f"The lifecycle audit triggers {names} are missing or disabled, so repairs would"
            " leave no audit row. Restore them (see `autodispatch audit`), then repair."
        )


def render(report: RepairReport, console: Console) -> None:
    """What was found and what was (or would be) changed, per kind of finding."""
    if not report.found and not any(k.skipped for k in report.kinds):
        console.print("[green]Nothing to repair.[/green]")
        return
    verb = "changed" if report.applied else "would change"
    table = Table(title=f"repair ({'applied' if report.applied else 'dry run'})", expand=True)
    table.add_column("finding", no_wrap=True)
    table.add_column("found", justify="right")
    table.add_column("fixed" if report.applied else "", justify="right")
    table.add_column(verb, ratio=1, overflow="fold")
    for kind in report.kinds:
        if not kind.found and not kind.skipped:
            continue
        lines = list(kind.changes)
        shown_of = kind.fixed if report.applied else kind.found
        if shown_of > len(lines):
            lines.append(f"… and {shown_of - len(lines)} more")
        lines += [f"[yellow]left alone: {why}[/yellow]" for why in kind.skipped[:SAMPLE]]
        if len(kind.skipped) > SAMPLE:
            lines.append(f"[yellow]… and {len(kind.skipped) - SAMPLE} more left alone[/yellow]")
        table.add_row(
            f"{kind.code}\n[dim]{kind.title}[/dim]",
            str(kind.found),
            str(kind.fixed) if report.applied else "",
            "\n".join(lines),
        )
    console.print(table)
    if not report.applied and report.found:
        console.print(
            f"Dry run: nothing changed. `autodispatch repair --apply` makes these"
            f" {report.found} changes; each row it moves gets a lifecycle_audit row (reason"
            " 'repair')."
        )
    elif report.applied and report.remaining:
        console.print(
            f"[yellow]{report.remaining} rows were left alone[/yellow] (changed or busy"
            " meanwhile); run `autodispatch audit`, then repair again."
        )
    console.print(
        "[dim]Findings repair does not change (schema, unknown statuses, lagging gateways)"
        " are listed, with their fix, by `autodispatch audit`.[/dim]"
    )
