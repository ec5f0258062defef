"""What every audit check works with: its findings, the report they go to, the options,
the catalog of what exists, and the context a check gets (``AuditContext``).

The checks (``schema``, ``data``) and the run that calls them (``run``) import this; it
imports none of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row

from autodispatch.db import queries

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
            "rows": [{k: plain(v) for k, v in row.items()} for row in self.rows],
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
            "facts": plain(self.facts),
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


def plain(value: Any) -> Any:
    """JSON-ready: ids and times as strings, containers recursively."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)
