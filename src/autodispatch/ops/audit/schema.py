"""The schema checks of `autodispatch audit`: what the database must have for the lifecycle
rules, row-level security and the event log to hold. Catalog queries only."""

from __future__ import annotations

import re

from autodispatch.domain.lifecycle import ASSIGNMENT, SESSION, Lifecycle
from autodispatch.ops.audit.context import AuditContext
from autodispatch.ops.audit.expected import (
    API_ROLES,
    EXPECTED_POLICIES,
    EXPECTED_TABLES,
    EXPECTED_TRIGGERS,
    KEYED_SHAPE,
    NO_RLS_NEEDED,
    OPEN_TABLES,
    POLICY_TABLES,
    normalise_expression,
)

SCHEMA = "schema"

_MIGRATIONS = "src/autodispatch/db/migrations"


async def check_revision(ctx: AuditContext) -> None:
    expected = ctx.options.expected_revision
    if not ctx.catalog.has_table("public", "alembic_version"):
        ctx.found(
            "not_migrated",
            SCHEMA,
            "The database has no alembic_version table: `autodispatch migrate` did not"
            " build it (a database the first version wrote?).",
            "Compare it with the findings below; a new database built by `autodispatch"
            " migrate` is the reference, and its data can be moved over.",
            severity="warning",
        )
        return
    rows = await ctx.rows("audit_revision")
    revision = rows[0]["version_num"] if rows else None
    ctx.report.facts["revision"] = revision
    if expected is not None and revision != expected:
        ctx.found(
            "migrations_behind" if revision is None or revision < expected else "migrations_ahead",
            SCHEMA,
            f"The database is at revision {revision or 'none'}; this code expects {expected}.",
            "Run `autodispatch migrate`."
            if revision is None or revision < expected
            else "This code is older than the database: run the newer autodispatch.",
            [{"revision": revision, "expected": expected}],
        )


async def check_tables(ctx: AuditContext) -> None:
    gone = [name for name in EXPECTED_TABLES if not ctx.catalog.has_table(*name.split("."))]
    if gone:
        ctx.found(
            "table_missing",
            SCHEMA,
            f"{len(gone)} tables this code needs do not exist: {', '.join(gone)}.",
            "Run `autodispatch migrate`; each table is made by the migration named in the"
            f" row ({_MIGRATIONS}).",
            [{"table": name, "migration": EXPECTED_TABLES[name]} for name in gone],
        )


_LITERAL = re.compile(r"'((?:[^']|'')*)'")


def allowed_by_checks(definitions: list[str]) -> set[str] | None:
    """The statuses a set of CHECK constraints allows (their quoted literals; all must
    hold), or None when none of them lists values."""
    allowed: set[str] | None = None
    for definition in definitions:
        lowered = definition.lower()
        if "<>" in lowered or " not " in lowered or "!=" in lowered:
            continue  # a list of refused values: not the list of statuses
        values = {v.replace("''", "'") for v in _LITERAL.findall(definition)}
        if values:
            allowed = values if allowed is None else allowed & values
    return allowed


async def check_status_values(ctx: AuditContext) -> None:
    lifecycles: dict[str, Lifecycle] = {"sessions": SESSION, "session_assignments": ASSIGNMENT}
    tables = [t for t in lifecycles if ctx.catalog.has_table("public", t)]
    if not tables:
        return
    checks: dict[str, list[str]] = {t: [] for t in tables}
    for row in await ctx.rows("audit_status_checks", {"tables": tables}):
        checks[row["table_name"]].append(row["definition"])
    types = {
        row["table_name"]: row for row in await ctx.rows("audit_status_types", {"tables": tables})
    }
    for table in tables:
        lifecycle = lifecycles[table]
        if table not in types:
            ctx.found(
                "status_column_missing",
                SCHEMA,
                f"public.{table} has no status column.",
                "This is not a dispatch schema this code can work with; rebuild with"
                " `autodispatch migrate`.",
                [{"table": table}],
            )
            continue
        enum_labels = types[table]["enum_labels"]
        allowed = set(enum_labels) if enum_labels else allowed_by_checks(checks[table])
        if allowed is None:
            ctx.found(
                "status_unconstrained",
                SCHEMA,
                f"public.{table}.status accepts any value: no CHECK constraint lists the"
                " allowed statuses.",
                f"Add the CHECK constraint of migration 0001 ({table}_status_check).",
                [{"table": table, "type": types[table]["type_name"]}],
            )
            continue
        states = {str(s) for s in lifecycle.states}
        if states - allowed:
            ctx.found(
                "status_not_allowed",
                SCHEMA,
                f"public.{table}.status does not allow {sorted(states - allowed)}, which the"
                f" {lifecycle.entity} lifecycle needs: those moves fail (the first version's"
                " assignments could not become 'completed', so they stayed queued).",
                f"Replace the constraint with the one of migration 0001 ({table}_status_check).",
                [{"table": table, "status": s} for s in sorted(states - allowed)],
            )
        if allowed - states:
            ctx.found(
                "status_not_in_lifecycle",
                SCHEMA,
                f"public.{table}.status allows {sorted(allowed - states)}, which the"
                f" {lifecycle.entity} lifecycle does not know.",
                "Move any rows in those statuses (see unknown_status), then replace the"
                f" constraint with the one of migration 0001 ({table}_status_check).",
                [{"table": table, "status": s} for s in sorted(allowed - states)],
            )


async def check_transitions(ctx: AuditContext) -> None:
    if not ctx.needs("transition table", SCHEMA, {"public.lifecycle_transitions": []}):
        return
    found = {
        (r["entity"], r["from_status"], r["to_status"]) for r in await ctx.rows("audit_transitions")
    }
    expected = {(lc.entity, a, b) for lc in (SESSION, ASSIGNMENT) for a, b in lc.pairs()}
    if found != expected:
        rows = [
            {"entity": e, "from": a, "to": b, "problem": "missing"}
            for e, a, b in sorted(expected - found)
        ] + [
            {"entity": e, "from": a, "to": b, "problem": "not in domain/lifecycle.py"}
            for e, a, b in sorted(found - expected)
        ]
        ctx.found(
            "transition_table_differs",
            SCHEMA,
            "public.lifecycle_transitions (the guard's table of allowed moves) differs from"
            " domain/lifecycle.py.",
            "Make the table hold exactly the moves of domain/lifecycle.py (migration 0001"
            " inserts them).",
            rows,
        )


async def check_triggers(ctx: AuditContext) -> None:
    present = {
        (f"{r['schema_name']}.{r['table_name']}", r["trigger_name"]): r
        for r in await ctx.rows("audit_triggers")
    }
    missing, disabled, other = [], [], []
    for (table, name), (function, purpose) in EXPECTED_TRIGGERS.items():
        if not ctx.catalog.has_table(*table.split(".")):
            continue  # reported by the tables check
        row = present.get((table, name))
        if row is None:
            missing.append({"table": table, "trigger": name, "purpose": purpose})
            continue
        if row["enabled"] not in ("O", "A"):
            disabled.append(
                {"table": table, "trigger": name, "purpose": purpose, "enabled": row["enabled"]}
            )
        runs = f"{row['function_schema']}.{row['function_name']}"
        if runs != function:
            other.append({"table": table, "trigger": name, "runs": runs, "expected": function})
    if missing:
        ctx.found(
            "trigger_missing",
            SCHEMA,
            f"{len(missing)} triggers the lifecycle or the event log rely on do not exist:"
            f" {', '.join(r['table'] + '.' + r['trigger'] for r in missing)}.",
            "Run `autodispatch migrate` on a database it built; otherwise recreate them as"
            f" in {_MIGRATIONS} (0001: lifecycle, 0002/0003: event log).",
            missing,
        )
    if disabled:
        ctx.found(
            "trigger_disabled",
            SCHEMA,
            f"{len(disabled)} triggers are disabled, so their rule no longer holds:"
            f" {', '.join(r['table'] + '.' + r['trigger'] for r in disabled)}.",
            "Enable each: `alter table <table> enable trigger <trigger>;`, then run"
            " `autodispatch audit` again for the data written meanwhile.",
            disabled,
        )
    if other:
        ctx.found(
            "trigger_runs_other_function",
            SCHEMA,
            f"{len(other)} triggers run another function than the migrations made them run.",
            f"Recreate them as in {_MIGRATIONS}.",
            other,
        )
    # Nothing runs in the commit of a writer beyond writing its events (migration 0008):
    # a trigger on the log itself (an id or a NOTIFY per event) would queue every writer
    # behind the others again.
    on_log = [
        {"table": table, "trigger": name} for (table, name) in present if table == "realtime.events"
    ]
    if on_log:
        ctx.found(
            "event_log_trigger",
            SCHEMA,
            f"realtime.events has triggers ({', '.join(r['trigger'] for r in on_log)}):"
            " they run in every writing transaction's commit path, and one that takes a"
            " shared lock or sends NOTIFY makes writers wait for each other.",
            "Drop them (`drop trigger <name> on realtime.events;`): events get their ids"
            " after commit from the sequencer (migration 0008).",
            on_log,
        )


async def check_row_security(ctx: AuditContext) -> None:
    tables = {r["table_name"]: r for r in await ctx.rows("audit_row_security")}
    no_rls = [t for t, r in tables.items() if not r["enabled"] and t not in NO_RLS_NEEDED]
    if no_rls:
        ctx.found(
            "rls_disabled",
            SCHEMA,
            f"Row-level security is off on {', '.join(no_rls)}: the API's roles read every row.",
            "`alter table <table> enable row level security;` and give it its visibility"
            " policy (docs/decisions.md, Visibility).",
            [{"table": t} for t in no_rls],
        )
    policies: dict[str, list[dict[str, object]]] = {}
    for row in await ctx.rows("audit_policies"):
        policies.setdefault(row["table_name"], []).append(dict(row))
    # Tables that need their one visibility policy: ours, and any other the API can read.
    governed = {t for t, r in tables.items() if t in POLICY_TABLES or r["api_readable"]}
    governed -= NO_RLS_NEEDED

    writes, open_rows, unexpected, missing, differs, not_keyed = [], [], [], [], [], []
    for table, found in sorted(policies.items()):
        for p in found:
            roles = set(p["roles"])  # type: ignore[call-overload]
            reaches_api = bool(roles & (API_ROLES | {"public"}))
            using = normalise_expression(str(p["qual"] or ""))
            name = str(p["policy_name"])
            row = {"table": table, "policy": name, "command": p["cmd"], "roles": sorted(roles)}
            if reaches_api and p["cmd"] in ("INSERT", "UPDATE", "DELETE", "ALL"):
                writes.append(row)
            elif reaches_api and using == "true" and table not in OPEN_TABLES:
                open_rows.append(row)
            elif table not in governed:
                continue  # a table the API cannot read: its policies do not reach the API
            elif name != f"{table}_visible":
                unexpected.append(row)
            elif table in EXPECTED_POLICIES:
                problems = _policy_problems(p, roles, using, EXPECTED_POLICIES[table])
                if problems:
                    differs.append(
                        {
                            **row,
                            "problems": problems,
                            "using": p["qual"],
                            "expected": EXPECTED_POLICIES[table],
                        }
                    )
            elif not KEYED_SHAPE.fullmatch(using):
                not_keyed.append({**row, "using": p["qual"]})
    for table in sorted(governed):
        if not any(p["policy_name"] == f"{table}_visible" for p in policies.get(table, [])):
            missing.append({"table": table, "policy": f"{table}_visible"})

    if writes:
        ctx.found(
            "policy_grants_writes",
            SCHEMA,
            f"{len(writes)} policies let the API's roles write rows; every change must go"
            " through the api.* functions, which check the caller and the state.",
            'Drop each: `drop policy "<policy>" on <table>;`.',
            writes,
        )
    if open_rows:
        ctx.found(
            "policy_too_broad",
            SCHEMA,
            f"{len(open_rows)} policies show every row (using true) on tables whose rows"
            " belong to someone (the first version let every mechanic read every assignment).",
            "Drop each; the table's own <table>_visible policy (visibility keys) is the rule.",
            open_rows,
        )
    if unexpected:
        ctx.found(
            "policy_unexpected",
            SCHEMA,
            f"{len(unexpected)} policies are not the one visibility policy of their table;"
            " permissive policies add up, so each one widens (or, restrictive, narrows) who"
            " reads what, for the API and for realtime delivery alike.",
            'Drop each: `drop policy "<policy>" on <table>;`.',
            unexpected,
        )
    if missing:
        ctx.found(
            "policy_missing",
            SCHEMA,
            f"{len(missing)} tables lack their visibility policy: with row-level security on,"
            " nobody (not the owner of a row, not realtime subscribers) can read them.",
            "Run `autodispatch migrate`, or recreate the policy as in the migration of that"
            f" table ({_MIGRATIONS}).",
            missing,
        )
    if differs:
        ctx.found(
            "policy_differs",
            SCHEMA,
            f"{len(differs)} visibility policies are not the ones the migrations made (each"
            " row says how: its expression, its command, its roles, restrictive): whoever"
            " they let read differs from what the realtime router delivers, which uses the"
            " stored visibility keys.",
            "Recreate each as in its migration: `drop policy <policy> on <table>;` then the"
            f" `create policy` of {_MIGRATIONS} (the row's `expected` is its expression).",
            differs,
        )
    if not_keyed:
        ctx.found(
            "policy_not_key_based",
            SCHEMA,
            f"{len(not_keyed)} visibility policies of tables this code does not know do not"
            " compare one visibility function of the row with auth.principal_keys() (and"
            " nothing else), so RLS and the realtime router can disagree.",
            "Make each `using (<table>_visibility_keys(<table>) && (select"
            " auth.principal_keys()))`, and add the table to EXPECTED_POLICIES in"
            " ops/audit/expected.py.",
            not_keyed,
        )

    grants = await ctx.rows("audit_write_grants")
    if grants:
        ctx.found(
            "write_privilege_granted",
            SCHEMA,
            f"The API's roles (or PUBLIC) hold {len(grants)} write privileges on public tables;"
            " they should only read, and write through the api.* functions.",
            "`revoke insert, update, delete, truncate on <table> from <grantee>;`",
            grants,
        )


def _policy_problems(
    policy: dict[str, object], roles: set[str], using: str, expected: str
) -> list[str]:
    problems = []
    if using != expected:
        problems.append("expression")
    if policy["cmd"] != "SELECT":
        problems.append(f"command {policy['cmd']}")
    if roles != API_ROLES:
        problems.append(f"roles {', '.join(sorted(roles))}")
    if policy["permissive"] != "PERMISSIVE":
        problems.append("restrictive")
    if policy["with_check"] is not None:
        problems.append("with check")
    return problems


CHECKS = [
    ("revision", SCHEMA, check_revision),
    ("tables", SCHEMA, check_tables),
    ("status values", SCHEMA, check_status_values),
    ("transition table", SCHEMA, check_transitions),
    ("triggers", SCHEMA, check_triggers),
    ("row-level security", SCHEMA, check_row_security),
]
