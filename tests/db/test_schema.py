"""The database built from the migrations is what the code expects, and the one the
schema files (db/schema) build is the same database."""

from __future__ import annotations

import difflib
import itertools
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from autodispatch.db import migrate, queries
from autodispatch.domain.lifecycle import ASSIGNMENT, LIFECYCLES, SESSION
from conftest import database_url

EXPECTED_TABLES = {
    "public": {
        "profiles",
        "workshops",
        "mechanics",
        "intakes",
        "sessions",
        "session_assignments",
        "waivers",
        "payments",
        "feature_flags",
        "lifecycle_transitions",
        "lifecycle_audit",
        "session_messages",
        "alert_receipts",
        "push_subscriptions",
        "probe_pings",
        "alembic_version",
    },
    "auth": {"users", "refresh_tokens", "sign_in_failures"},
}


def test_migrations_build_the_expected_schema(db_url: str) -> None:
    """Every table we use exists, RLS is on for each public table, and the flags are seeded."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select table_schema, table_name from information_schema.tables"
            " where table_schema in ('public', 'auth') and table_type = 'BASE TABLE'"
        ).fetchall()
        found: dict[str, set[str]] = {}
        for schema, name in rows:
            found.setdefault(schema, set()).add(name)
        assert found == EXPECTED_TABLES
        no_rls = conn.execute(
            "select relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
            " where n.nspname = 'public' and c.relkind = 'r' and not c.relrowsecurity"
            " and relname <> 'alembic_version'"
        ).fetchall()
        assert no_rls == []
        flags = {r[0] for r in conn.execute("select key from feature_flags").fetchall()}
        assert flags == {
            "mech_new_request_alerts",
            "mech_audio_alerts",
            "mech_browser_notifications",
            "mech_visual_indicators",
        }
        cols = {
            r[0]
            for r in conn.execute(
                "select column_name from information_schema.columns"
                " where table_name = 'session_assignments'"
            ).fetchall()
        }
        assert {"id", "session_id", "status", "request_summary", "mechanic_id"} <= cols
        triggers = {
            r[0]
            for r in conn.execute(
                "select tgname from pg_trigger where not tgisinternal and tgenabled <> 'D'"
            ).fetchall()
        }
        assert {
            "sessions_guard",
            "sessions_audit",
            "sessions_create_assignment",
            "sessions_sync_assignment",
            "session_assignments_guard",
            "session_assignments_audit",
            "session_assignments_sync_session",
        } <= triggers


def test_the_api_roles_can_call_no_function_of_the_internal_schemas(db_url: str) -> None:
    """anon and authenticated reach the data through RLS and the api.* functions only:
    no function of the realtime schema (event log, re-keying, removals) is executable by
    them, including those added by later migrations (a new function is executable by
    PUBLIC unless revoked)."""
    with psycopg.connect(db_url) as conn:
        callable_ = conn.execute(
            "select r.rolname, p.oid::regprocedure::text from pg_proc p"
            " join pg_namespace n on n.oid = p.pronamespace"
            " cross join pg_roles r"
            " where n.nspname = 'realtime' and r.rolname in ('anon', 'authenticated')"
            " and has_function_privilege(r.oid, p.oid, 'EXECUTE')"
        ).fetchall()
    assert callable_ == []


def test_migrate_is_idempotent_and_at_head(db_url: str) -> None:
    """Running the migrations again changes nothing and the database is at head."""
    assert migrate.upgrade(db_url) == (migrate.head(), migrate.head())
    assert migrate.current(db_url) == migrate.head()


def test_empty_database_migrates_from_nothing(pg_server: str) -> None:
    """An empty database starts at no revision and ends at head."""
    name = f"autodispatch_m_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    try:
        url = database_url(pg_server, name)
        assert migrate.current(url) is None
        assert migrate.upgrade(url) == (None, migrate.head())
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'drop database "{name}" with (force)')


def test_the_visibility_key_functions_are_inlined_into_their_callers(db_url: str) -> None:
    """Every ``*_visibility_keys`` SQL function is inlined where it is called (RLS
    policies, the capture trigger), not run as a function planned again in each
    transaction: a plan that calls one shows its expression, never its name. (The intake's
    keys come from a subquery on sessions, which PostgreSQL does not inline.)"""
    with psycopg.connect(db_url) as conn:
        functions = conn.execute(
            "select p.proname, p.proargtypes[0]::regtype::text from pg_proc p"
            " join pg_namespace n on n.oid = p.pronamespace"
            " where n.nspname = 'public' and p.proname like '%\\_visibility\\_keys'"
            " and p.prolang = (select oid from pg_language where lanname = 'sql')"
            " and p.proname <> 'intake_visibility_keys'"
        ).fetchall()
        assert len(functions) >= 7, functions
        for name, argument in functions:
            if argument == "uuid":
                source, value = "public.profiles t", "t.id"
            else:
                source, value = f"{argument} t", "t"
            plan = conn.execute(
                f"explain (verbose, costs off) select public.{name}({value}) from {source}"
            ).fetchall()
            text = "\n".join(row[0] for row in plan)
            assert f"{name}(" not in text, f"{name} is not inlined:\n{text}"


def test_every_named_query_parses_against_the_schema(db_url: str) -> None:
    """Each query in db/sql prepares against the migrated schema (no typos in names)."""
    with psycopg.connect(db_url) as conn:
        for name, sql in queries.load().items():
            # PREPARE checks names and types without running anything.
            params: dict[str, Any] = {}
            text = sql
            import re

            for i, param in enumerate(dict.fromkeys(re.findall(r"%\((\w+)\)s", sql)), 1):
                text = text.replace(f"%({param})s", f"${i}")
                params[param] = i
            try:
                conn.execute(f"prepare q_{name} as {text}".encode())
            except psycopg.Error as exc:
                pytest.fail(f"query {name} does not prepare: {exc}")
            conn.execute(f"deallocate q_{name}")


def _insert_session(conn: psycopg.Connection[Any]) -> tuple[uuid.UUID, uuid.UUID]:
    user = conn.execute(
        "insert into auth.users (email, password_hash) values (%s, 'x') returning id",
        (f"u{uuid.uuid4().hex[:8]}@t.example",),
    ).fetchone()
    assert user is not None
    conn.execute(
        "insert into profiles (id, account_type, full_name) values (%s, 'customer', 'C')",
        (user[0],),
    )
    intake = conn.execute(
        "insert into intakes (customer_id, name, vehicle_year, vehicle_make, vehicle_model,"
        " concern) values (%s, 'C', 2010, 'A', 'B', 'c') returning id",
        (user[0],),
    ).fetchone()
    assert intake is not None
    session = conn.execute(
        "insert into sessions (customer_id, intake_id, type) values (%s, %s, 'free') returning id",
        (user[0], intake[0]),
    ).fetchone()
    assert session is not None
    assignment = conn.execute(
        "select id from session_assignments where session_id = %s", (session[0],)
    ).fetchone()
    assert assignment is not None
    return session[0], assignment[0]


@pytest.mark.parametrize("entity", ["session", "assignment"])
def test_database_allows_exactly_the_python_moves(db_url: str, entity: str) -> None:
    """For every pair of states, PostgreSQL accepts the move iff the Python table allows it."""
    lifecycle = LIFECYCLES[entity]
    table = "sessions" if entity == "session" else "session_assignments"
    with psycopg.connect(db_url) as conn:
        sql_pairs = {
            (a, b)
            for a, b in conn.execute(
                "select from_status, to_status from lifecycle_transitions where entity = %s",
                (entity,),
            ).fetchall()
        }
        assert sql_pairs == lifecycle.pairs()
        session_id, assignment_id = _insert_session(conn)
        row_id = session_id if entity == "session" else assignment_id
        conn.commit()
        for a, b in itertools.product(sorted(lifecycle.states), repeat=2):
            if a == b:
                continue
            with conn.transaction(force_rollback=True):
                # Only the guard is under test here: the sync triggers and the row checks
                # are switched off inside this rolled-back transaction.
                conn.execute("alter table sessions disable trigger sessions_sync_assignment")
                conn.execute(
                    "alter table session_assignments"
                    " disable trigger session_assignments_sync_session,"
                    " drop constraint session_assignments_offer_check,"
                    " drop constraint session_assignments_mechanic_check"
                )
                # Put the row in state a without any trigger, then try a -> b with them.
                conn.execute("set local session_replication_role = replica")
                conn.execute(f"update {table} set status = %s where id = %s", (a, row_id))
                conn.execute("set local session_replication_role = origin")
                try:
                    with conn.transaction():
                        conn.execute(f"update {table} set status = %s where id = %s", (b, row_id))
                    allowed = True
                except psycopg.Error as exc:
                    assert exc.sqlstate == "AD409", exc
                    assert f"'{a}'" in str(exc) and f"'{b}'" in str(exc), str(exc)
                    allowed = False
                assert allowed == lifecycle.allows(a, b), (entity, a, b)


def test_python_tables_cover_the_check_constraints(db_url: str) -> None:
    """The status CHECK constraints allow exactly the states of the Python tables."""
    with psycopg.connect(db_url) as conn:
        for constraint, lifecycle in (
            ("sessions_status_check", SESSION),
            ("session_assignments_status_check", ASSIGNMENT),
        ):
            definition = conn.execute(
                "select pg_get_constraintdef(oid) from pg_constraint where conname = %s",
                (constraint,),
            ).fetchone()
            assert definition is not None
            states = set(__import__("re").findall(r"'(\w+)'", definition[0]))
            assert states == lifecycle.states


# ---------------------------------------------------------------------------
# The schema files (db/schema) build what the migrations build.
# ---------------------------------------------------------------------------

CATALOG = queries.parse((Path(__file__).parent / "schema_catalog.sql").read_text(encoding="utf-8"))


def catalog(url: str) -> list[str]:
    """The database's schema and seeded rows as sorted lines: "<kind> <object>: <text>",
    one line per line of a multi-line definition (a function's body)."""
    lines: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("set search_path = ''")
        conn.execute(CATALOG["acl_text"].encode())
        for kind, query in CATALOG.items():
            if kind in ("acl_text", "seeded_tables"):
                continue
            rows = conn.execute(query.encode()).fetchall()
            for name, text in sorted(rows):
                lines.extend(f"{kind} {name}: {line}" for line in str(text).splitlines())
        for schema, table, volatile in sorted(
            conn.execute(CATALOG["seeded_tables"].encode()).fetchall()
        ):
            rows = conn.execute(
                sql.SQL("select (to_jsonb(t) - %s::text[])::text from {} t").format(
                    sql.Identifier(schema, table)
                ),
                (volatile,),
            ).fetchall()
            lines.extend(sorted(f"row {schema}.{table}: {row[0]}" for row in rows))
    return lines


@pytest.fixture(scope="module")
def built(pg_server: str) -> Iterator[tuple[str, str]]:
    """Two new databases: one migrated from empty, one loaded from the schema files."""
    names = [f"autodispatch_{kind}_{uuid.uuid4().hex[:10]}" for kind in ("migrated", "loaded")]
    with psycopg.connect(pg_server, autocommit=True) as conn:
        for name in names:
            conn.execute(f'create database "{name}"')
    try:
        migrated, loaded = (database_url(pg_server, name) for name in names)
        migrate.upgrade(migrated)
        migrate.load_schema(loaded)
        yield migrated, loaded
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            for name in names:
                conn.execute(f'drop database if exists "{name}" with (force)')


def test_the_schema_files_build_the_database_the_migrations_build(
    built: tuple[str, str],
) -> None:
    """Tables, columns, constraints, indexes, functions, triggers, policies, privileges and
    seeded rows of a database loaded from db/schema are those of one migrated from empty."""
    migrated, loaded = built
    expected, found = catalog(migrated), catalog(loaded)
    assert len(expected) > 1000, "the catalog queries read next to nothing"
    if expected != found:
        diff = difflib.unified_diff(
            expected, found, "built by the migrations", "loaded from db/schema", lineterm="", n=2
        )
        pytest.fail("db/schema and the migrations differ:\n" + "\n".join(diff), pytrace=False)


def test_both_databases_are_at_the_newest_revision(built: tuple[str, str]) -> None:
    """A database loaded from the schema files is stamped at head, as a migrated one is, so
    the server accepts it and the next migration applies to it."""
    migrated, loaded = built
    assert migrate.current(migrated) == migrate.head()
    assert migrate.current(loaded) == migrate.head()


def test_load_schema_refuses_a_database_that_is_not_empty(db_url: str) -> None:
    """load_schema builds new databases only: on a migrated one it raises and changes
    nothing."""
    before = catalog(db_url)
    with pytest.raises(RuntimeError, match="not empty"):
        migrate.load_schema(db_url)
    assert catalog(db_url) == before


# What the schema files create, as written: `create [or replace] function schema.name(`
# (the arguments up to the matching parenthesis), `create table schema.name`, `create
# [or replace] [constraint] trigger name ... on schema.table`.
_FUNCTION = re.compile(
    r"\bcreate\s+(?:or\s+replace\s+)?(?:function|procedure)\s+([\w.]+)\s*\(", re.I
)
_TABLE = re.compile(r"\bcreate\s+(?:unlogged\s+)?table\s+(?:if\s+not\s+exists\s+)?([\w.]+)", re.I)
_TRIGGER = re.compile(
    r"\bcreate\s+(?:or\s+replace\s+)?(?:constraint\s+)?trigger\s+(\w+)\s.*?\bon\s+([\w.]+)",
    re.I | re.S,
)
_MODES = {"in", "out", "inout", "variadic"}


def _code(text: str) -> str:
    """The SQL without its line comments (no literal in the schema files holds "--")."""
    return re.sub(r"--[^\n]*", "", text)


def _argument_types(arguments: str) -> str:
    """The identity argument types of a written argument list: OUT arguments, names and
    defaults left out (every argument in the schema files has a name)."""
    types: list[str] = []
    depth, start, parts = 0, 0, []
    for i, char in enumerate(arguments):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(arguments[start:i])
            start = i + 1
    parts.append(arguments[start:])
    for part in parts:
        words = re.split(r"\s+(?:default\b|=).*", part.strip(), flags=re.I | re.S)[0].split()
        if not words:
            continue
        if words[0].lower() in _MODES:
            if words[0].lower() == "out":
                continue
            words = words[1:]
        types.append(" ".join(words[1:]))
    return ", ".join(types)


def _created_functions(text: str) -> list[str]:
    found = []
    for match in _FUNCTION.finditer(text):
        depth, end = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        found.append(f"{match.group(1)}({_argument_types(text[match.end() : end - 1])})")
    return found


def test_each_object_is_created_in_exactly_one_schema_file(db_url: str) -> None:
    """Every function, table and trigger of the migrated database is created once in the
    schema files, never again in another file (or the same): the files say what is, not
    how it came to be."""
    created: dict[str, Counter[str]] = {
        "function": Counter(),
        "table": Counter(),
        "trigger": Counter(),
    }
    where: dict[str, list[str]] = {}
    with psycopg.connect(db_url) as conn:
        # Every name written out with its schema, as the files write them.
        conn.execute("set search_path = ''")
        for file, text in migrate.schema_files():
            code = _code(text)
            for written in _created_functions(code):
                row = conn.execute("select to_regprocedure(%s)::text", (written,)).fetchone()
                assert row is not None and row[0] is not None, (
                    f"{file}: {written} is no function of the database"
                )
                created["function"][row[0]] += 1
                where.setdefault(row[0], []).append(file)
            for table in _TABLE.findall(code):
                created["table"][table] += 1
                where.setdefault(table, []).append(file)
            for trigger, table in _TRIGGER.findall(code):
                created["trigger"][f"{table} {trigger}"] += 1
                where.setdefault(f"{table} {trigger}", []).append(file)
        exists = {
            "function": {
                r[0]
                for r in conn.execute(
                    "select p.oid::regprocedure::text"
                    " from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
                    " where n.nspname <> 'information_schema' and n.nspname !~ '^pg_'"
                ).fetchall()
            },
            "table": {
                r[0]
                for r in conn.execute(
                    "select n.nspname || '.' || c.relname from pg_class c"
                    " join pg_namespace n on n.oid = c.relnamespace"
                    " where n.nspname <> 'information_schema' and n.nspname !~ '^pg_'"
                    " and c.relkind in ('r', 'p') and c.relname <> 'alembic_version'"
                ).fetchall()
            },
            "trigger": {
                r[0]
                for r in conn.execute(
                    "select n.nspname || '.' || c.relname || ' ' || t.tgname from pg_trigger t"
                    " join pg_class c on c.oid = t.tgrelid"
                    " join pg_namespace n on n.oid = c.relnamespace where not t.tgisinternal"
                ).fetchall()
            },
        }
    for kind, counts in created.items():
        twice = {name: where[name] for name, count in counts.items() if count > 1}
        assert not twice, f"created more than once: {twice}"
        assert set(counts) == exists[kind], (
            f"{kind}s the migrations make and the schema files do not create (or the other way"
            f" round): {sorted(set(counts) ^ exists[kind])}"
        )
