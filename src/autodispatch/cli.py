"""The ``autodispatch`` command: serve, migrate, create-user, db-url, audit, repair, bench, ..."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import signal
import socket
import sys
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import psycopg
import typer
import uvicorn
from rich.console import Console

from autodispatch.config import Settings
from autodispatch.db import migrate as migrations
from autodispatch.db.urls import with_database
from autodispatch.realtime.websocket import Gateway
from autodispatch.realtime.wsserver import protocol_for

if TYPE_CHECKING:
    from autodispatch.bench.writes import Run

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


def _migrate(url: str) -> None:
    """Bring the database to the head revision, saying which revision runs and for how long
    (a migration of a large database can take minutes)."""
    from autodispatch.ops.progress import Steps, alembic_revisions

    if migrations.current(url) == migrations.head():
        return
    with Steps(err, "Migrating the database") as steps, alembic_revisions(steps):
        before, after = migrations.upgrade(url)
    if before != after:
        err.print(
            f"Migrated the database from {before or 'empty'} to {after} in {steps.elapsed:.1f} s."
        )


@app.command()
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
        _migrate(url)
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


@app.command()
def migrate() -> None:
    """Bring the database to the newest schema."""
    settings = Settings.from_env()
    with database(settings) as url:
        _migrate(url)
        out.print(f"The database is at revision {migrations.current(url)}.")


@app.command("create-user")
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
        _migrate(url)
        try:
            user = asyncio.run(go(url))
        except AppError as exc:
            err.print(f"[red]Not created:[/red] {exc.message}")
            raise typer.Exit(1) from None
    out.print(f"Created {role} {user['email']} ({user['id']}).")


@app.command("db-url")
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        raise SystemExit(130) from None


@app.command("explain-delivery")
def explain_delivery_command(
    event: Annotated[int, typer.Option(help="Event id (the SSE id / data.event_id)")],
    user: Annotated[str, typer.Option(help="Email of the user")],
    event_type: Annotated[
        str, typer.Option("--event-type", help="Subscribed event: * or INSERT, UPDATE, DELETE")
    ] = "*",
    row_filter: Annotated[
        str | None, typer.Option("--filter", help="Subscription filter, e.g. status=eq.queued")
    ] = None,
) -> None:
    """Say whether a user gets an event, and which visibility key or filter decides it.

    Exit code 0: delivered; 1: not delivered (or no such event/user)."""
    from autodispatch.db.database import Database
    from autodispatch.realtime.explain import explain_delivery

    settings = Settings.from_env()

    async def go(url: str) -> tuple[bool, str]:
        db = Database(url, min_size=1, max_size=2)
        await db.open()
        try:
            found = await explain_delivery(
                db, event, user, event_filter=event_type, row_filter=row_filter
            )
            return found.delivered, found.text
        finally:
            await db.close()

    with database(settings) as url:
        delivered, text = asyncio.run(go(url))
    out.print(text, highlight=False)
    if not delivered:
        raise typer.Exit(1)


@app.command()
def probe(
    email: Annotated[str, typer.Option(help="The account to probe as")],
    password: Annotated[str, typer.Option(help="Its password")],
    url: Annotated[str, typer.Option(help="The server's base URL")] = "http://127.0.0.1:8000",
    row_filter: Annotated[
        str | None,
        typer.Option("--filter", help="Subscribe with this filter, e.g. nonce=eq.x"),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait at each step")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
    explain: Annotated[
        bool,
        typer.Option(help="When the event does not come, ask the database why"),
    ] = True,
) -> None:
    """Check delivery end to end as one user: sign in, connect, subscribe, cause a harmless
    change that user may see, and time its event. Names the step that fails.

    Exit code 0: the event arrived; 1: a step failed."""
    from rich.table import Table

    from autodispatch.ops.probe import run_probe

    result = asyncio.run(run_probe(url, email, password, row_filter=row_filter, timeout=timeout))
    why: str | None = None
    failed = result.failed
    if failed is not None and failed.name == "delivery" and result.ping_id and explain:
        why = _explain_probe(result.ping_id, email, row_filter)
    if as_json:
        body = result.as_json()
        body["explanation"] = why
        out.print_json(data=body)
    else:
        table = Table(title=f"probe as {email}")
        for column in ("step", "result", "ms", "detail"):
            table.add_column(column)
        for step in result.steps:
            mark = "[green]ok[/green]" if step.ok else "[red]FAILED[/red]"
            table.add_row(step.name, mark, f"{step.ms:.1f}", step.detail)
        out.print(table)
        if result.ok:
            out.print(
                f"Delivered: {result.latency_ms} ms from request to event"
                f" ({result.commit_to_receive_ms} ms from commit)."
            )
        elif failed is not None:
            out.print(f"[red]The probe failed at {failed.name}:[/red] {failed.detail}")
        if why:
            out.print(why, highlight=False)
    if not result.ok:
        raise typer.Exit(1)


def _explain_probe(ping_id: str, email: str, row_filter: str | None) -> str:
    """Why the probe's event did not reach it, from the event log (needs the database)."""
    from autodispatch.db.database import Database
    from autodispatch.ops.probe import explain_missing
    from autodispatch.realtime.explain import explain_delivery

    async def go(db_url: str) -> str:
        db = Database(db_url, min_size=1, max_size=2)
        await db.open()
        try:
            event_id = None
            for _ in range(10):  # the change committed; its event id is set at commit
                event_id = await explain_missing(db, ping_id)
                if event_id is not None:
                    break
                await asyncio.sleep(0.2)
            if event_id is None:
                return (
                    f"No event was logged for probe ping {ping_id}:"
                    " is the capture trigger on probe_pings missing?"
                )
            found = await explain_delivery(db, event_id, email, row_filter=row_filter)
            return found.text
        finally:
            await db.close()

    settings = Settings.from_env()
    try:
        with database(settings) as db_url:
            return asyncio.run(go(db_url))
    except (OSError, psycopg.Error) as exc:
        return f"Could not read the event log to explain why ({exc})."


bench_app = typer.Typer(help="Benchmarks that print figures.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("contention")
def bench_contention(
    mechanics: Annotated[int, typer.Option(help="Mechanics racing")] = 50,
    requests: Annotated[int, typer.Option(help="Requests to race for")] = 1000,
    database_url: Annotated[
        str | None,
        typer.Option(help="An empty database to use instead of a fresh embedded one"),
    ] = None,
) -> None:
    """N mechanics race over HTTP for M requests: accepts/s and latency, against a baseline."""
    from rich.table import Table

    from autodispatch.bench.contention import contention
    from autodispatch.ops.progress import Steps

    with Steps(err) as steps:
        phases, machine = contention(mechanics, requests, database_url, steps)
    rows = [p.row() for p in phases]
    table = Table(title=f"{mechanics} mechanics, {requests} requests — {machine}")
    table.add_column("figure")
    for row in rows:
        table.add_column(str(row["phase"]).split(":")[0])
    for key in rows[0]:
        if key != "phase":
            table.add_row(key, *(str(row[key]) for row in rows))
    out.print(table)
    problems = [e for p in phases for e in p.errors]
    for p in phases:
        if len(p.winners) != requests:
            problems.append(f"{p.name}: {len(p.winners)} accepted, expected {requests}")
    if problems:
        err.print("[red]Outcome check failed:[/red]")
        for problem in problems[:20]:
            err.print(f"  {problem}")
        raise typer.Exit(1)
    out.print("Outcome check: exactly one winner per request, every other attempt a 409.")


@bench_app.command("writes")
def bench_writes(
    writers: Annotated[str, typer.Option(help="Writer counts, comma-separated")] = "1,8,32,64",
    workloads: Annotated[
        str, typer.Option(help="Workloads: chat, lifecycle, mix (comma-separated)")
    ] = "chat,lifecycle,mix",
    seconds: Annotated[float, typer.Option(help="Measured seconds per round", min=0.5)] = 2.0,
    rounds: Annotated[
        int, typer.Option(help="Rounds: the modes take turns this many times", min=1)
    ] = 3,
    database_url: Annotated[
        str | None,
        typer.Option(help="An empty database to use instead of a fresh embedded one"),
    ] = None,
) -> None:
    """Commits/s and commit latency with the event log on, numbered at commit as before
    migration 0008, written by the WAL decoder (db/decoder.py), and off, in the same run;
    the rate each log kept up with; how soon a reader has the events (docs/benchmarks.md)."""
    from rich.table import Table

    from autodispatch.bench.machine import machine
    from autodispatch.bench.writes import WORKLOADS, writes

    counts = [int(w) for w in writers.split(",") if w.strip()]
    chosen = [w.strip() for w in workloads.split(",") if w.strip()]
    unknown = [w for w in chosen if w not in WORKLOADS]
    if unknown or not counts or min(counts) < 1:
        raise typer.BadParameter(
            f"workloads must be among {', '.join(WORKLOADS)} and writers positive counts;"
            f" got workloads {chosen} and writers {counts}"
        )
    runs, version = writes(
        database_url,
        writer_counts=counts,
        workloads=chosen,
        seconds=seconds,
        rounds=rounds,
        progress=lambda text: err.print(text),
    )
    table = Table(title=f"bench writes — PostgreSQL {version} — {machine()}")
    for column in ("workload", "writers", "commits/s: log on", "at commit (before)", "decoded",
                   "log off", "on / off", "rounds: on / off", "decoded / off",
                   "kept up: decoded / off", "p50 / p99 ms: on", "decoded", "off"):  # fmt: skip
        table.add_column(column)
    by_key = {(r.workload, r.writers, r.mode): r for r in runs}
    for workload in chosen:
        for count in counts:
            on, old, decoded, off = (
                by_key[(workload, count, m)] for m in ("on", "at commit", "decoded", "off")
            )
            table.add_row(
                workload,
                str(count),
                f"{on.rate:,.0f}",
                f"{old.rate:,.0f}",
                f"{decoded.rate:,.0f}",
                f"{off.rate:,.0f}",
                _ratio(on.rate, off.rate),
                _round_ratios(on, off),
                _ratio(decoded.rate, off.rate),
                _ratio(decoded.kept_rate, off.rate),
                on.latency_text(),
                decoded.latency_text(),
                off.latency_text(),
            )
    wide = Console(width=max(out.width, 200))  # whole figures, also when piped
    wide.print(table)
    wide.print(
        "kept up: commits/s counted until the log held them all (each round's writes over"
        " its seconds plus the log's lag when it ended): the rate the log kept up with."
    )
    fastest = max((r for r in runs if r.mode == "on"), key=lambda r: r.rate)
    for mode in ("on", "at commit", "decoded"):
        run = by_key[(fastest.workload, fastest.writers, mode)]
        wide.print(
            f"{fastest.workload}, {fastest.writers} writers (the fastest run with the log on),"
            f" log {mode}: {run.rate:,.0f} commits/s; a reader had each event"
            f" {run.percentile(run.received_ms, 0.5):.1f} ms (p50) /"
            f" {run.percentile(run.received_ms, 0.99):.1f} ms (p99) after its write"
            f" ({len(run.received_ms):,} events); the log's lag after each round:"
            f" {', '.join(f'{c * 1000:.0f}' for c in run.catch_up)} ms."
        )


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def _round_ratios(on: Run, off: Run) -> str:
    """The lowest and highest on/off ratio of one round: how much the machine drifted."""
    ratios = [a / b for a, b in zip(on.round_rates, off.round_rates, strict=True) if b]
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-"


@bench_app.command("realtime")
def bench_realtime(
    subscribers: Annotated[
        int | None, typer.Option(help="Subscribers for the latency figure and the ramp [1000]")
    ] = None,
    idle_connections: Annotated[
        int | None, typer.Option(help="Idle joined connections for the memory figure [5000]")
    ] = None,
    rate: Annotated[float | None, typer.Option(help="Events/s of the latency figure [100]")] = None,
    duration: Annotated[
        float | None, typer.Option(help="Seconds of the latency figure [30]")
    ] = None,
    processes: Annotated[int, typer.Option(help="Subscriber (load generator) processes")] = 2,
    baseline: Annotated[
        bool, typer.Option(help="Also measure the per-subscriber SQL baseline")
    ] = True,
    quick: Annotated[
        bool, typer.Option(help="Scaled down (300 subscribers, 1000 idle, short steps): ~3 min")
    ] = False,
    database_url: Annotated[
        str | None,
        typer.Option(help="An empty database to use instead of a fresh embedded one"),
    ] = None,
    profile_server: Annotated[
        str | None, typer.Option(help="Run the keys server under pyinstrument; text report here")
    ] = None,
    json_path: Annotated[
        str | None, typer.Option("--json", help="Also write the figures as JSON here")
    ] = None,
) -> None:
    """Realtime delivery: latency, sustained deliveries/s, memory per connection, DB work per
    event, against a per-subscriber-SQL baseline (a real serve process; load in others)."""
    import json
    from pathlib import Path

    try:
        from autodispatch.bench import realtime as bench
    except ImportError as exc:  # websockets is a test/dev dependency
        err.print(f"[red]bench realtime needs {exc.name}:[/red] pip install 'autodispatch[test]'")
        raise typer.Exit(1) from None

    given = {
        "subscribers": subscribers,
        "idle_connections": idle_connections,
        "rate": rate,
        "duration": duration,
    }
    overrides: dict[str, object] = {k: v for k, v in given.items() if v is not None}
    overrides.update(
        processes=processes,
        baseline=baseline,
        database_url=database_url,
        profile_server=Path(profile_server).resolve() if profile_server else None,
    )
    options = (
        bench.RealtimeOptions.quick_options(**overrides)
        if quick
        else bench.RealtimeOptions(**overrides)  # type: ignore[arg-type]
    )
    from autodispatch.ops.progress import Steps

    with Steps(err) as steps:
        report = bench.realtime(options, steps)
    # The tables are wide: when printing to a file or a pipe, do not fold them to 80 columns.
    bench.render(report, out if out.is_terminal else Console(width=170))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report.as_json(), indent=2, default=str))
        err.print(f"Figures written to {json_path}")


@app.command()
def audit(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")] = False,
) -> None:
    """Check the schema, the data and realtime delivery of the database in use.

    Works on any database with the dispatch tables (a missing piece is a finding). Each
    finding names its rows and its fix; `repair --apply` fixes the repairable ones.
    Exit code 0: nothing found; 1: findings; 2: the database could not be read."""
    from autodispatch.ops.audit.context import AuditOptions, AuditReport
    from autodispatch.ops.audit.run import render, run_audit

    settings = Settings.from_env()
    options = AuditOptions(
        request_ttl_seconds=settings.request_ttl_seconds, expected_revision=migrations.head()
    )

    async def go(url: str) -> AuditReport:
        async with await psycopg.AsyncConnection.connect(url, connect_timeout=10) as conn:
            return await run_audit(conn, options)

    with database(settings) as url:
        try:
            report = asyncio.run(go(url))
        except psycopg.Error as exc:
            err.print(f"[red]Could not audit the database:[/red] {exc}")
            raise typer.Exit(2) from None
    if as_json:
        sys.stdout.write(json.dumps(report.as_json(), indent=2) + "\n")
    else:
        render(report, out if out.is_terminal else Console(width=160))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def repair(
    apply: Annotated[
        bool, typer.Option("--apply", help="Make the changes (without it: only say what they are)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")] = False,
) -> None:
    """Fix the data findings of `audit`: sessions and assignments that disagree, sessions
    without an assignment, offers and requests past their time, stale visibility keys,
    events without an id, gateways that died. A dry run unless --apply; each change
    writes a lifecycle_audit row with the reason 'repair'; running it again changes nothing.

    Exit code 0: nothing left to repair (or a dry run); 1: rows were left alone or the
    repair was refused; 2: the database could not be read."""
    from autodispatch.ops.progress import Bars
    from autodispatch.ops.repair import RepairOptions, RepairRefused, RepairReport, render
    from autodispatch.ops.repair import repair as run_repair

    settings = Settings.from_env()
    options = RepairOptions(apply=apply, request_ttl_seconds=settings.request_ttl_seconds)

    async def go(url: str, bars: Bars) -> RepairReport:
        async with await psycopg.AsyncConnection.connect(url, connect_timeout=10) as conn:
            return await run_repair(conn, options, bars)

    with database(settings) as url, Bars(err) as bars:
        try:
            report = asyncio.run(go(url, bars))
        except RepairRefused as exc:
            err.print(f"[red]Nothing repaired:[/red] {exc}")
            raise typer.Exit(1) from None
        except psycopg.Error as exc:
            err.print(f"[red]Could not repair the database:[/red] {exc}")
            raise typer.Exit(2) from None
    if as_json:
        sys.stdout.write(json.dumps(report.as_json(), indent=2) + "\n")
    else:
        render(report, out if out.is_terminal else Console(width=160))
    if apply and report.remaining:
        raise typer.Exit(1)
