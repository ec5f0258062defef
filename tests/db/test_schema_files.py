"""The schema files (db/schema/) build the database the migrations build, and define each
object once: the one place to read what the database is."""

from __future__ import annotations

import difflib
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from autodispatch.db import migrate, queries
from conftest import database_url

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


_CLUSTER_STATEMENT = re.compile(
    r"\b(?:create|alter|drop)\s+role\s[^;]+;|\bgrant\s+[\w\s,]+\s+to\s+current_user\s*;", re.I
)


def _cluster_statements(text: str) -> list[str]:
    return [" ".join(m.group(0).lower().split()) for m in _CLUSTER_STATEMENT.finditer(_code(text))]


def test_the_schema_files_make_the_roles_as_the_migrations_do() -> None:
    """Roles belong to the cluster: both databases of the comparison above share them, so
    it cannot see how each way makes them. The files must make them with the very
    statements the migrations use (a role made superuser or able to log in would pass
    every catalog comparison in a cluster where the roles already exist)."""
    migrations = sorted((Path(migrate.__file__).parent / "migrations").glob("*.sql"))
    made = [s for f in migrations for s in _cluster_statements(f.read_text(encoding="utf-8"))]
    loaded = [s for _, text in migrate.schema_files() for s in _cluster_statements(text)]
    assert made, "no role statement found in the migrations: the pattern is stale"
    assert loaded == made
