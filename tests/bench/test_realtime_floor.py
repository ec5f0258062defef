"""The floor `autodispatch bench realtime` measures, and how its verdicts use it."""

from __future__ import annotations

from autodispatch.bench.realtime.floor import Floor, measure_floor
from autodispatch.bench.realtime.render import verdicts
from autodispatch.bench.realtime.report import RealtimeOptions, Report, Window


def test_every_frame_of_every_burst_arrives_and_is_timed() -> None:
    """Real loopback sockets and reader processes: each of the bursts reaches each
    recipient once (a frame lost or split wrongly would change the count), and the
    latencies are real durations in order."""
    floor = measure_floor(24, processes=2, bursts=6, interval=0.01)
    assert floor.frames == 24 * 6
    assert 0 < floor.p50_ms <= floor.p99_ms < 5_000
    assert floor.burst_ms > 0


def test_the_p50_verdict_states_the_floor_and_is_judged_on_the_measure_alone() -> None:
    """The figure says what the machine allows (commit-to-read plus the floor's burst
    median); the verdict stays the measured p50 against 5 ms."""
    report = Report(machine="m", date="d", options=RealtimeOptions(), generator_processes=2)
    window = Window("keys", "latency", 1000, 100.0, p50_ms=6.0, p99_ms=20.0, read_p50_ms=1.5)
    report.windows.append(window)
    report.floor = Floor(
        recipients=600, bursts=150, frames=90_000, p50_ms=4.0, p99_ms=9.0, burst_ms=6.0
    )
    p50 = next(v for v in verdicts(report) if v.target.startswith("p50"))
    assert p50.figure == "6.0 ms (machine floor ~5.5 ms)"
    assert p50.met is False
    window.p50_ms = 4.9
    assert next(v for v in verdicts(report) if v.target.startswith("p50")).met is True
