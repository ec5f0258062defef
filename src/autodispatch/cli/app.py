"""The ``autodispatch`` command's root: the Typer app, its consoles, and what its commands
share (the database to use, embedded or not, and migrating it with progress)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
import typer
from rich.console import Console

from autodispatch.config import Settings
from autodispatch.db import migrate as migrations
from autodispatch.db.urls import with_database

app = typer.Typer(
    help="Realtime dispatch of customer session requests to mechanics.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)
out = Console()

EMBEDDED_DATABASE = "autodispatch"


def configure_logging(log_format: str = "auto") -> None:
    """JSON log lines (a person at a terminal gets readable ones), request ids included."""
    from autodispatch.logs import FORMATS
    from autodispatch.logs import configure_logging as configure

    if log_format not in FORMATS:
        err.print(
            f"[red]--log-format must be one of {', '.join(FORMATS)}, not {log_format!r}[/red]"
        )
        raise typer.Exit(2)
    configure(log_format)


def _ensure_database(server_url: str, name: str) -> str:
    with psycopg.connect(server_url, autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone()
        if not exists:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(f'create database "{name}"')
    return with_database(server_url, name)


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[str]:
    """The URL of the database to use: DATABASE_URL, or the embedded server in the home folder."""
    if settings.database_url:
        yield settings.database_url
        return
    from autodispatch.db.embedded import EmbeddedPostgres, EmbeddedPostgresError

    settings.home.mkdir(parents=True, exist_ok=True)
    server = EmbeddedPostgres(settings.home / "postgres")
    try:
        server_url = server.start()
    except EmbeddedPostgresError as exc:
        err.print(f"[red]Could not start the embedded PostgreSQL:[/red] {exc}")
        raise typer.Exit(1) from None
    try:
        yield _ensure_database(server_url, EMBEDDED_DATABASE)
    finally:
        server.stop()


def migrate_with_progress(url: str) -> None:
    """Bring the database to the head revision, saying which revision runs and for how long
    (a migration of a large database can take minutes)."""
    from autodispatch.cli.progress import Steps, alembic_revisions

    if migrations.current(url) == migrations.head():
        return
    with Steps(err, "Migrating the database") as steps, alembic_revisions(steps):
        before, after = migrations.upgrade(url)
    if before != after:
        err.print(
            f"Migrated the database from {before or 'empty'} to {after} in {steps.elapsed:.1f} s."
        )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
