"""Commands that run or prepare a server: serve, migrate, create-user, db-url."""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
from types import FrameType
from typing import Annotated

import typer
import uvicorn

from autodispatch.cli.app import (
    EMBEDDED_DATABASE,
    configure_logging,
    database,
    err,
    migrate_with_progress,
    out,
)
from autodispatch.config import Settings
from autodispatch.db import migrate as migrations
from autodispatch.db.urls import with_database
from autodispatch.realtime.websocket import Gateway
from autodispatch.realtime.wsserver import protocol_for


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    demo: Annotated[bool, typer.Option(help="Create the demo accounts and print them")] = False,
    log_format: Annotated[
        str, typer.Option(help="Log lines: json, console, or auto (console on a terminal)")
    ] = "auto",
) -> None:
    """Serve the API, realtime and pages in one process.

    Logs go to stderr, one JSON object per line (unless a terminal watches), each line of a
    request with its request_id (the X-Request-ID header, echoed in every response)."""
    from autodispatch.app import create_app
    from autodispatch.db.database import Database
    from autodispatch.identity.accounts import Accounts
    from autodispatch.ops.demo import DEMO_PASSWORD, ensure_demo_accounts

    configure_logging(log_format)
    settings = Settings.from_env().with_secret()
    with database(settings) as url:
        migrate_with_progress(url)
        if demo:

            async def seed() -> list[tuple[object, bool]]:
                db = Database(url, min_size=1, max_size=2)
                await db.open()
                try:
                    return list(await ensure_demo_accounts(db, Accounts(db, settings)))
                finally:
                    await db.close()

            rows = asyncio.run(seed())
            base = f"http://{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:{port}"
            out.print(f"[bold]autodispatch demo[/bold] on {base}  (password: {DEMO_PASSWORD})")
            for account, created in rows:
                note = "created" if created else "exists"
                out.print(f"  {account.email:32} {account.account_type:9} ({note})")  # type: ignore[attr-defined]
            out.print(f"  Mechanic:  {base}/mechanic   (mechanic@demo.test)")
            out.print(f"  Customer:  {base}/customer   (customer@demo.test)")
            out.print(f"  Admin:     {base}/admin      (admin@demo.test)")
            out.print(f"  Probe:     {base}/probe      (any account)")
            out.print(f"  API docs:  {base}/docs")
            out.print(f"  Health:    {base}/healthz")
        # uvicorn re-raises SIGTERM once it has shut down; with the default handler that
        # would kill us before the embedded PostgreSQL is stopped, so turn it into an exit.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        web_app = create_app(settings, url)
        config = uvicorn.Config(
            web_app,
            host=host,
            port=port,
            log_level="info",
            # Our logging (autodispatch.logs) formats uvicorn's lines too; the middleware
            # logs each request with its id, so uvicorn's own access log would repeat it.
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            # The realtime WebSocket paths are served on the socket itself (realtime/wsserver);
            # other WebSocket routes go through uvicorn's own protocol.
            ws=protocol_for(web_app.state.gateway),
        )
        server = AnnouncingServer(config, web_app.state.gateway)
        server.run()
        if not server.started:
            err.print(f"[red]The server did not start[/red] (is port {port} in use?)")
            raise typer.Exit(1)


class AnnouncingServer(uvicorn.Server):
    """uvicorn's server, telling realtime clients why before it closes their sockets."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # Everything built so far lives as long as the process: keep it out of the
        # collector's full scans, which otherwise pause every socket for 50-150 ms
        # (docs/benchmarks.md).
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.gateway.announce_shutdown()
        super().handle_exit(sig, frame)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def migrate() -> None:
    """Bring the database to the newest schema."""
    settings = Settings.from_env()
    with database(settings) as url:
        migrate_with_progress(url)
        out.print(f"The database is at revision {migrations.current(url)}.")


def create_user(
    email: Annotated[str, typer.Option(help="Sign-in email")],
    password: Annotated[
        str, typer.Option(prompt=True, hide_input=True, help="At least 8 characters")
    ],
    role: Annotated[str, typer.Option(help="customer, mechanic or admin")] = "mechanic",
    name: Annotated[str, typer.Option(help="Name shown to others")] = "",
    workshop: Annotated[
        str | None, typer.Option(help="Workshop of a mechanic (created if new)")
    ] = None,
) -> None:
    """Create an account: mechanics (independent or in a workshop), admins or customers."""
    from autodispatch.db.database import Database
    from autodispatch.domain.errors import AppError
    from autodispatch.identity.accounts import Accounts

    settings = Settings.from_env().with_secret()

    async def go(url: str) -> dict[str, object]:
        db = Database(url, min_size=1, max_size=2)
        await db.open()
        try:
            return await Accounts(db, settings).create_user(
                email=email,
                password=password,
                account_type=role,
                full_name=name or email.split("@")[0],
                workshop=workshop,
            )
        finally:
            await db.close()

    with database(settings) as url:
        migrate_with_progress(url)
        try:
            user = asyncio.run(go(url))
        except AppError as exc:
            err.print(f"[red]Not created:[/red] {exc.message}")
            raise typer.Exit(1) from None
    out.print(f"Created {role} {user['email']} ({user['id']}).")


def db_url() -> None:
    """Print the URL of the database in use, for psql "$(autodispatch db-url)"."""
    settings = Settings.from_env()
    if settings.database_url:
        print(settings.database_url)
        return
    from autodispatch.db.embedded import running_url

    url = running_url(settings.home / "postgres")
    if url is None:
        err.print(
            f"The embedded PostgreSQL in {settings.home} is not running; start it with"
            " `autodispatch serve`, or set DATABASE_URL."
        )
        raise typer.Exit(1)
    print(with_database(url, EMBEDDED_DATABASE))
