"""`autodispatch bench ...`: the benchmarks' commands and their tables (autodispatch/bench)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from autodispatch.bench.writes import Run

from autodispatch.cli.app import err, out

bench_app = typer.Typer(help="Benchmarks that print figures.", no_args_is_help=True)


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
    from autodispatch.cli.progress import Steps

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
            on, old, off = (by_key[(workload, count, m)] for m in ("on", "at commit", "off"))
            decoded = by_key.get((workload, count, "decoded"))  # none where it cannot run
            table.add_row(
                workload,
                str(count),
                f"{on.rate:,.0f}",
                f"{old.rate:,.0f}",
                f"{decoded.rate:,.0f}" if decoded else "-",
                f"{off.rate:,.0f}",
                _ratio(on.rate, off.rate),
                _round_ratios(on, off),
                _ratio(decoded.rate, off.rate) if decoded else "-",
                _ratio(decoded.kept_rate, off.rate) if decoded else "-",
                on.latency_text(),
                decoded.latency_text() if decoded else "-",
                off.latency_text(),
            )
    wide = Console(width=max(out.width, 200))  # whole figures, also when piped
    wide.print(table)
    wide.print(
        "kept up: commits/s counted until the log held them all (each round's writes over"
        " its seconds plus the log's lag at the window's end): the rate the log kept up with."
    )
    fastest = max((r for r in runs if r.mode == "on"), key=lambda r: r.rate)
    for mode in ("on", "at commit", "decoded"):
        run = by_key.get((fastest.workload, fastest.writers, mode))
        if run is None:
            continue
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
    from autodispatch.cli.progress import Steps

    with Steps(err) as steps:
        report = bench.realtime(options, steps)
    # The tables are wide: when printing to a file or a pipe, do not fold them to 80 columns.
    bench.render(report, out if out.is_terminal else Console(width=170))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report.as_json(), indent=2, default=str))
        err.print(f"Figures written to {json_path}")
