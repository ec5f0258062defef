"""Apply the migrations with Alembic.

The revisions live in ``db/alembic/versions`` and each runs one plain SQL file from
``db/migrations``; a PostgreSQL advisory lock keeps two processes from migrating one
database at once.
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


def run_sql_file(name: str) -> None:
    """Run one migration SQL file on the migration's connection, as one script."""
    sql = (resources.files("autodispatch.db") / "migrations" / name).read_text(encoding="utf-8")
    driver = op.get_bind().connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    # No parameters: psycopg sends the whole script at once, dollar-quotes intact.
    driver.execute(sql.encode())


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
