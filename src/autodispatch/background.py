"""Background loops that survive any error, and how long each has gone without doing its work.

`serve` runs loops beside the requests (offer expiry, the Web Push sender, the gateway
heartbeat, the bus listener, ...). A loop that ends on an exception nobody expected
leaves the state wrong and says nothing, so each loop reports to the app's one
``Loops``, which logs and counts every failure and lets ``/readyz`` name a loop that has
not completed a run for too long.

Two ways to use it. A loop that runs one step every N seconds lets ``run_forever`` drive
it::

    loops = Loops(metrics.registry)          # one per app (create_app makes it)
    await loops.run_forever("expiry", expire_once, interval=0.5, stop=stop)

``expire_once`` is an ``async`` function of no arguments; one that returns ``True`` has
more work waiting and is run again at once instead of after ``interval``. Any
``Exception`` it raises (never ``CancelledError``) is logged and counted, and the loop
goes on.

A loop with a shape of its own (a listener, a reader woken by NOTIFY) registers itself
and reports each run::

    health = loops.register("realtime-reader", stale_after=30)
    while not stop.is_set():
        try:
            ...
        except Exception as exc:
            health.failed(exc)
        else:
            health.ok()

What it gives:

- each failure is one log line (``event``, default ``background_loop_failed``, with
  ``loop`` and ``error``): a warning for the ``transient`` exception types (default
  ``TRANSIENT``: a lost connection, a deadlock; expected now and then, no traceback), an
  error with the traceback for anything else;
- ``autodispatch_background_loop_errors_total{loop}`` counts the failures;
- ``autodispatch_background_loop_last_success_timestamp_seconds{loop}`` is the Unix time
  of the last completed run (0 until the first);
- ``Loops.stale()``: a reason for each loop whose last completed run (or its
  registration, before the first) is older than its ``stale_after``; ``/readyz`` answers
  503 with them. ``run_forever`` sets it to ``stale_after_for(interval)``: ten intervals,
  and never less than 30 s, so a slow run or two (a database failover) does not take
  the process out of the load balancer, while a loop that stopped does within a minute.

Registering a name again replaces the earlier loop of that name (a restarted loop).
This module imports nothing else of ours (it sits in the lowest layers): every layer may
use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator

import psycopg
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

log = structlog.get_logger("autodispatch.background")

STALE_INTERVALS = 10
MIN_STALE_SECONDS = 30.0

Iteration = Callable[[], Awaitable[bool | None]]
Transient = tuple[type[BaseException], ...]
# What a loop that talks to the database should expect now and then: a lost or refused
# connection, a deadlock, a pool that timed out (all OperationalError), a socket error.
TRANSIENT: Transient = (psycopg.OperationalError, OSError)


def stale_after_for(interval: float) -> float:
    """How long a loop that runs every ``interval`` seconds may go without a completed run
    before it counts as stopped: ten intervals, at least 30 s."""
    return max(STALE_INTERVALS * interval, MIN_STALE_SECONDS)


class LoopHealth:
    """One loop's record: when it last completed a run, and its last error."""

    def __init__(
        self,
        loops: Loops,
        name: str,
        *,
        stale_after: float,
        transient: Transient = TRANSIENT,
        event: str = "background_loop_failed",
    ) -> None:
        if not stale_after > 0:
            raise ValueError(f"stale_after must be more than 0 seconds, not {stale_after!r}")
        self.name = name
        self.stale_after = stale_after
        self.transient = transient
        self.event = event
        self.registered_at = time.monotonic()
        self.last_success: float | None = None  # time.monotonic() of the last completed run
        self.last_error: str | None = None
        self.errors = 0
        self._errors = loops.errors.labels(name)
        self._last_success = loops.last_success.labels(name)

    def ok(self) -> None:
        """A run completed."""
        self.last_success = time.monotonic()
        self._last_success.set(time.time())

    def failed(self, exc: BaseException) -> None:
        """A run failed with ``exc``: log it and count it (the loop goes on)."""
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._errors.inc()
        if isinstance(exc, self.transient):
            log.warning(self.event, loop=self.name, error=self.last_error)
        else:
            log.error(self.event, loop=self.name, error=self.last_error, exc_info=exc)

    def idle_seconds(self, now: float | None = None) -> float:
        """Seconds since the last completed run (since registration, before the first)."""
        since = self.last_success if self.last_success is not None else self.registered_at
        return (time.monotonic() if now is None else now) - since

    def stale_reason(self, now: float | None = None) -> str | None:
        """Why this loop counts as stopped, or None while it runs."""
        idle = self.idle_seconds(now)
        if idle <= self.stale_after:
            return None
        done = "never completed a run" if self.last_success is None else "not completed a run"
        error = f"; last error: {self.last_error}" if self.last_error else ""
        return (
            f"the background loop {self.name} has {done} for {idle:.1f} s"
            f" (allowed {self.stale_after:g} s){error}"
        )


class Loops:
    """The background loops of one app, for its logs, its metrics and ``/readyz``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.errors = Counter(
            "autodispatch_background_loop_errors_total",
            "Failed runs of a background loop (logged; the loop goes on), by loop",
            ["loop"],
            registry=registry,
        )
        self.last_success = Gauge(
            "autodispatch_background_loop_last_success_timestamp_seconds",
            "Unix time of a background loop's last completed run, by loop",
            ["loop"],
            registry=registry,
        )
        self._loops: dict[str, LoopHealth] = {}

    def register(
        self,
        name: str,
        *,
        stale_after: float,
        transient: Transient = TRANSIENT,
        event: str = "background_loop_failed",
    ) -> LoopHealth:
        """Start keeping ``name``'s record (replacing an earlier loop of that name)."""
        health = LoopHealth(self, name, stale_after=stale_after, transient=transient, event=event)
        self._loops[name] = health
        return health

    def __getitem__(self, name: str) -> LoopHealth:
        return self._loops[name]

    def __iter__(self) -> Iterator[LoopHealth]:
        return iter(list(self._loops.values()))

    def stale(self) -> list[str]:
        """A reason for each loop that has gone too long without a completed run."""
        now = time.monotonic()
        return [reason for loop in self if (reason := loop.stale_reason(now)) is not None]

    async def run_forever(
        self,
        name: str,
        iteration: Iteration,
        *,
        interval: float,
        stop: asyncio.Event,
        stale_after: float | None = None,
        transient: Transient = TRANSIENT,
        event: str = "background_loop_failed",
    ) -> None:
        """Run ``iteration`` about every ``interval`` seconds until ``stop`` is set; an
        exception is logged and counted, and the next run comes anyway."""
        health = self.register(
            name,
            stale_after=stale_after if stale_after is not None else stale_after_for(interval),
            transient=transient,
            event=event,
        )
        while not stop.is_set():
            more = False
            try:
                more = await iteration() is True
            except Exception as exc:
                health.failed(exc)
            else:
                health.ok()
            if more:
                await asyncio.sleep(0)  # others may run between back-to-back runs
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)


async def cancel_tasks(*tasks: asyncio.Task[None] | None) -> None:
    """Cancel the tasks (None is skipped) and wait until all have ended, whatever they
    raise."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
