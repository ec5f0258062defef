"""The database built from the migrations is what the code expects, and the one the
schema files (db/schema) build is the same database."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import psycopg
import pytest

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
