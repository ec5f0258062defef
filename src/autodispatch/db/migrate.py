"""Apply the migrations with Alembic, or load the current schema in one go.

The revisions live in ``db/alembic/versions`` and each runs one plain SQL file from
``db/migrations``; a PostgreSQL advisory lock keeps two processes from migrating one
database at once. ``db/schema`` holds the schema the migrations end at, one file per
concern: ``load_schema`` builds a new database from it, stamped at the newest revision
(tests/db/test_schema_files.py holds the two ways equal).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import psycopg
import sqlalchemy
from alembic import command, op
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

# Any fixed number: the advisory lock that serialises migrations of one database.
_MIGRATION_LOCK = 7_246_013


def _alembic_dir() -> Path:
    return Path(str(resources.files("autodispatch.db") / "alembic"))


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(_alembic_dir()))
    return config


def _run_script(conn: sqlalchemy.Connection, sql: str) -> None:
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    # No parameters: psycopg sends the whole script at once, dollar-quotes intact.
    driver.execute(sql.encode())


def run_sql_file(name: str) -> None:
    """Run one migration SQL file on the migration's connection, as one script."""
    sql = (resources.files("autodispatch.db") / "migrations" / name).read_text(encoding="utf-8")
    _run_script(op.get_bind(), sql)


def schema_files() -> list[tuple[str, str]]:
    """The files of ``db/schema`` as (name, text), in the order they load."""
    folder = resources.files("autodispatch.db") / "schema"
    entries = sorted((e for e in folder.iterdir() if e.name.endswith(".sql")), key=lambda e: e.name)
    return [(e.name, e.read_text(encoding="utf-8")) for e in entries]


def _engine(url: str) -> sqlalchemy.Engine:
    return sqlalchemy.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(url), poolclass=sqlalchemy.NullPool
    )


def head() -> str:
    """The newest revision this code knows."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None
    return revision


def current(url: str) -> str | None:
    """The revision the database is at, or None for an empty database."""
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def upgrade(url: str, target: str = "head") -> tuple[str | None, str]:
    """Bring the database to the newest revision (or to ``target``, for tests of a
    migration against data the code before it wrote); return (before, after)."""
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"select pg_advisory_lock({_MIGRATION_LOCK})")
            try:
                before = MigrationContext.configure(conn).get_current_revision()
                config = _config()
                config.attributes["connection"] = conn
                command.upgrade(config, target)
                after = MigrationContext.configure(conn).get_current_revision()
            finally:
                conn.exec_driver_sql(f"select pg_advisory_unlock({_MIGRATION_LOCK})")
    finally:
        engine.dispose()
    assert after is not None
    return before, after


# Any relation, function or type of a schema that is not PostgreSQL's own, any
# publication, default privilege or setting of this database: what the files would
# build on, or hand their objects to.
_NOT_EMPTY = """
select exists (select from pg_class c join pg_namespace n on n.oid = c.relnamespace
               where n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast'))
    or exists (select from pg_proc p join pg_namespace n on n.oid = p.pronamespace
               where n.nspname not in ('pg_catalog', 'information_schema'))
    or exists (select from pg_namespace
               where nspname not in ('public', 'pg_catalog', 'information_schema', 'pg_toast')
                 and nspname !~ '^pg_(toast_)?temp_')
    or exists (select from pg_type t join pg_namespace n on n.oid = t.typnamespace
               where n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast'))
    or exists (select from pg_publication)
    or exists (select from pg_default_acl)
    or exists (select from pg_db_role_setting
               where setdatabase = (select oid from pg_database where datname = current_database()))
"""


def load_schema(url: str) -> str:
    """Build the current schema in an empty database from ``db/schema`` (each file as one
    script, in name order) and stamp it at the newest revision, in one transaction; return
    that revision. A database that holds anything already is refused: ``upgrade`` is the
    way to bring an existing one up to date."""
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            # upgrade's lock, held to the end of this transaction: a failed file leaves
            # nothing behind, and the lock goes with the rollback.
            conn.exec_driver_sql(f"select pg_advisory_xact_lock({_MIGRATION_LOCK})")
            if conn.exec_driver_sql(_NOT_EMPTY).scalar():
                raise RuntimeError(
                    "load_schema builds a new database, and this one is not empty;"
                    " use upgrade (autodispatch migrate) to bring it up to date"
                )
            for _name, sql in schema_files():
                _run_script(conn, sql)
            config = _config()
            config.attributes["connection"] = conn
            command.stamp(config, "head")
            after = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    assert after is not None
    return after
