"""Targets (from the issue) and the printed report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autodispatch.bench.realtime.report import Report, Window


@dataclass(frozen=True)
class Verdict:
    target: str
    figure: str
    met: bool | None  # None: not measured


def verdicts(report: Report) -> list[Verdict]:
    o = report.options
    found: list[Verdict] = []
    for lat in (w for w in report.windows if w.strategy == "keys" and w.name.startswith("latency")):
        where = f"{lat.subscribers} subscribers, {o.rate:g} events/s"
        if lat.gateways > 1:
            where += f", {lat.gateways} gateway processes"
        figure = f"{lat.p50_ms:,.1f} ms"
        if report.floor is not None and lat.read_p50_ms == lat.read_p50_ms:
            # What no gateway could beat here: commit to read, then the burst alone.
            floor = lat.read_p50_ms + report.floor.p50_ms
            figure += f" (machine floor ~{floor:,.1f} ms)"
        found.append(Verdict(f"p50 < 5 ms ({where})", figure, lat.p50_ms < 5))
        found.append(Verdict(f"p99 < 50 ms ({where})", f"{lat.p99_ms:,.1f} ms", lat.p99_ms < 50))
    best = report.best("keys", within_limit=True)
    found.append(
        Verdict(
            ">= 40,000 deliveries/s from one gateway, p99 <= 100 ms",
            f"{best.deliveries_per_s:,.0f}/s" if best else "no step within 100 ms",
            best is not None and best.deliveries_per_s >= 40_000,
        )
    )
    mem = report.memory[0] if report.memory else None
    if mem is not None:
        found.append(
            Verdict(
                f"< 20 KB per idle connection ({mem.connections} connections)",
                f"{mem.per_connection / 1000:.1f} KB",
                mem.per_connection < 20_000,
            )
        )
    keys = sorted(
        (s for s in report.statements if s.strategy == "keys"), key=lambda s: s.subscribers
    )
    if len(keys) >= 2:
        # "The same": not more at many subscribers than at few (a busier reader batches more).
        low, high = keys[0], keys[-1]
        same = high.counter_per_event <= low.counter_per_event * 1.25 + 0.05
        figure = f"{low.counter_per_event:.2f} vs {high.counter_per_event:.2f}"
        pg_low, pg_high = low.pg_per_event, high.pg_per_event
        if pg_low is not None and pg_high is not None:
            same = same and pg_high <= pg_low * 1.25 + 0.05
            figure += f" (pg_stat_statements {pg_low:.2f} vs {pg_high:.2f})"
        found.append(
            Verdict(
                f"DB statements/event the same at {low.subscribers} and {high.subscribers}"
                " subscribers",
                figure,
                same,
            )
        )
    if o.baseline:
        # Throughput: the most deliveries/s each strategy kept up with, whatever the latency
        # (the baseline may meet the 100 ms limit at no rate at all).
        ours = report.best("keys", within_limit=False)
        base = report.best("per_subscriber_sql", within_limit=False)
        target = ">= 10x the baseline's deliveries/s (most kept up with)"
        if ours is not None and base is not None and base.deliveries_per_s > 0:
            ratio = ours.deliveries_per_s / base.deliveries_per_s
            figure = f"{ratio:.1f}x ({ours.deliveries_per_s:,.0f} vs {base.deliveries_per_s:,.0f})"
            found.append(Verdict(target, figure, ratio >= 10))
        else:
            figure = "baseline kept up with no step" if ours else "keys kept up with no step"
            found.append(Verdict(target, figure, ours is not None))
    return found


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:,.1f}"  # NaN: nothing received


def _cpu(w: Window) -> str:
    parts = (w.server_cpu, w.postgres_cpu, w.generator_cpu, w.other_cpu)
    return " / ".join("-" if v != v else f"{v:.0f}" for v in parts)


def _result(w: Window) -> str:
    if w.drain_seconds is None:
        return "fell behind (never caught up)"
    if not w.kept_up:
        return f"fell behind ({w.drain_seconds:.1f} s to catch up)"
    if w.disconnects:
        return f"{w.disconnects} disconnects"
    return "within 100 ms" if w.within_limit else "kept up, p99 > 100 ms"


def _windows_table(title: str, windows: list[Window]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("strategy")
    table.add_column("step")
    for col in ("subscribers", "target ev/s", "events/s", "deliveries/s", "fan-out"):
        table.add_column(col, justify="right")
    for col in (
        "p50 ms",
        "p99 ms",
        "max ms",
        "server p99 ms",
        "read p50 ms",
        "CPU % serve/PG/load/other",
    ):
        table.add_column(col, justify="right")
    table.add_column("result")
    for w in windows:
        table.add_row(
            w.strategy,
            w.name.removeprefix("ramp "),
            str(w.subscribers),
            f"{w.target_rate:,.4g}",
            f"{w.events_per_s:,.1f}",
            f"{w.deliveries_per_s:,.0f}",
            f"{w.fan_out:.0f}",
            _ms(w.p50_ms),
            _ms(w.p99_ms),
            _ms(w.max_ms),
            "> 5,000" if w.server_p99_ms == float("inf") else "<= " + _ms(w.server_p99_ms),
            _ms(w.read_p50_ms),
            _cpu(w),
            _result(w),
        )
    return table


def render(report: Report, console: Any) -> None:
    """Print the report as Rich tables."""
    from rich.table import Table

    o = report.options
    console.print(
        f"[bold]autodispatch bench realtime[/bold] — {report.date}\n"
        f"Machine: {report.machine}\n"
        f"Server: one `autodispatch serve` process (the latency figure also on"
        f" {o.latency_gateways}, sharing the subscribers); load: {report.generator_processes}"
        " subscriber processes, and the bench process writing events"
        + (" [yellow](--quick: scaled down)[/yellow]" if o.quick else "")
    )
    latency = [w for w in report.windows if w.name.startswith("latency")]
    console.print(
        _windows_table(
            f"Commit-to-received latency at {o.rate:g} events/s (the baseline: "
            f"{o.baseline_duration:g} s of writes, measured until all were delivered)",
            latency,
        )
    )
    if report.floor is not None:
        f = report.floor
        console.print(
            f"Floor of this machine for a {f.recipients}-recipient event (floor.py: one"
            f" send of a prebuilt 2 KB frame per loopback socket, nothing else; "
            f"{f.bursts} bursts, {f.frames:,} frames): the median frame lands"
            f" {f.p50_ms:.1f} ms after its burst starts, p99 {f.p99_ms:.1f} ms; a burst"
            f' takes {f.burst_ms:.1f} ms to write. "read p50 ms" is commit to the gateway'
            " holding the event (median, a bucket's upper bound), before any fan-out;"
            " the p50 verdict's floor is the two added."
        )
    ramp = [w for w in report.windows if w.name.startswith("ramp")]
    console.print(
        _windows_table(
            "Ramp: event rate up until the server falls behind "
            f"(not caught up {o.keep_up_seconds:g} s after the writes stop)",
            ramp,
        )
    )
    for strategy in ("keys", "per_subscriber_sql"):
        inside = report.best(strategy, within_limit=True)
        kept = report.best(strategy, within_limit=False)
        if kept is None and inside is None:
            continue
        console.print(
            f"{strategy}: most deliveries/s within 100 ms p99: "
            + (f"{inside.deliveries_per_s:,.0f}" if inside else "none")
            + "; most kept up with: "
            + (f"{kept.deliveries_per_s:,.0f}" if kept else "none")
        )

    if report.memory:
        mem = Table(title="Server memory (RSS of the serve process), idle joined connections")
        for col in ("connections", "RSS before", "RSS after", "per connection", "open+join time"):
            mem.add_column(col, justify="right")
        for m in report.memory:
            mem.add_row(
                str(m.connections),
                f"{m.rss_before / 2**20:,.0f} MiB",
                f"{m.rss_after / 2**20:,.0f} MiB",
                f"{m.per_connection / 1000:.1f} KB",
                f"{m.open_seconds:.1f} s",
            )
        console.print(mem)

    st = Table(
        title=f"Database statements per event ({o.statements_rate:g} events/s for"
        f" {o.statements_seconds:g} s)"
    )
    for col in (
        "strategy",
        "subscribers",
        "events routed",
        "realtime counter",
        "pg_stat_statements",
    ):
        st.add_column(col, justify="left" if col == "strategy" else "right")
    for s in report.statements:
        pg = s.pg_per_event
        st.add_row(
            s.strategy,
            str(s.subscribers),
            str(s.events),
            f"{s.counter_per_event:.2f}",
            "n/a" if pg is None else f"{pg:.2f}",
        )
    console.print(st)

    targets = Table(title="Targets")
    targets.add_column("target")
    targets.add_column("figure", justify="right")
    targets.add_column("")
    for v in verdicts(report):
        mark = "[green]PASS[/green]" if v.met else "[red]MISS[/red]"
        targets.add_row(v.target, v.figure, "n/a" if v.met is None else mark)
    console.print(targets)
    for note in report.notes:
        console.print(f"Note: {note}")
