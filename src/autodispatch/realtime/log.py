"""The event log reader: one per process, reading the log in order and routing each event.

NOTIFY wakes it (on its own autocommit connection, STYLE.md); a short timer covers what
NOTIFY cannot (a notification lost while the connection was down). It reads on a second
autocommit connection of its own: one statement per read, no pool checkout, BEGIN or
COMMIT between the wake-up and the rows. It starts at the log's head: subscribers that
need older events resume from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog
from psycopg.rows import DictRow, dict_row

from autodispatch.background import Loops, stale_after_for
from autodispatch.db import queries
from autodispatch.db.database import Database
from autodispatch.realtime.events import Event
from autodispatch.realtime.metrics import RealtimeMetrics
from autodispatch.realtime.principals import is_principal_change
from autodispatch.realtime.router import Router, Subscription

log = structlog.get_logger("autodispatch.realtime")

CHANNEL = "autodispatch_events"
LISTEN_TIMEOUT = 5.0  # seconds of silence before the listener checks its connection
# A service transaction is BEGIN, one query, COMMIT (psycopg sends each on its own).
TX_STATEMENTS = 3
# From this many events in one read, frames are gathered per connection (see route_all):
# one transaction writes up to a few events, so smaller reads keep the fastest path.
BATCH_FROM = 4

AsyncRoute = Callable[[Event], Awaitable[Mapping[str, int]]]


class EventLogReader:
    def __init__(
        self,
        db: Database,
        router: Router,
        metrics: RealtimeMetrics,
        *,
        poll_interval: float = 0.25,
        batch: int = 1000,
    ) -> None:
        self.db = db
        self.router = router
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.batch = batch
        self.position = 0  # the highest event id read (its routing may still be under way)
        self.routed = 0  # the highest event id whose routing has finished
        self.slow_consumer_seconds = 2.0  # how long a full queue may hold the reader up
        self.started = asyncio.Event()
        self._wake = asyncio.Event()
        self._conn: psycopg.AsyncConnection[DictRow] | None = None  # reads the log
        # Hook for a routing strategy that must await per event (the per-subscriber SQL
        # baseline of `autodispatch bench realtime`, realtime/baseline.py). None: route
        # with the router's in-memory key index, without awaiting anything.
        self.route_async: AsyncRoute | None = None
        # Called with (last id read, next id read) when the log has a hole (see _advance).
        self.on_gap: Callable[[int, int], None] | None = None
        # Called, in its place among the events, with each change of a user's keys
        # (realtime/principals.py): the hub re-keys that user's subscriptions there.
        self.on_principal: Callable[[Event], None] | None = None

    def wake(self) -> None:
        """New events have ids (this process's sequencer says so): read them now."""
        self._wake.set()

    async def head(self) -> tuple[int, int]:
        async with self.db.as_service() as tx:
            row = await tx.one("stream_head")
        self.metrics.statements("head", TX_STATEMENTS)
        assert row is not None
        return int(row["last_id"]), int(row["pruned_through"])

    async def run(self, stop: asyncio.Event, loops: Loops | None = None) -> None:
        """Read and route until ``stop``; any error is logged, counted (here and in
        ``loops``, which ``/readyz`` watches) and the next read comes anyway."""
        loops = loops if loops is not None else Loops()
        health = loops.register(
            "realtime-reader",
            stale_after=stale_after_for(self.poll_interval),
            event="event_log_read_failed",
        )
        self.position, _ = await self.head()
        self.started.set()
        listener = asyncio.create_task(self._listen(stop, loops), name="realtime-listen")
        try:
            while not stop.is_set():
                try:
                    await self.read_available()
                except Exception as exc:
                    self.metrics.reader_errors.inc()
                    health.failed(exc)
                else:
                    health.ok()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)
                self._wake.clear()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error, OSError):
                    await self._conn.close()
                self._conn = None

    async def read_available(self) -> int:
        """Read and route everything committed after ``position``; return how many."""
        total = 0
        while True:
            rows = await self._read()
            self.metrics.statements("read_log")
            if self.route_async is None:
                await self.route_all([Event.from_row(row) for row in rows])
            else:
                for row in rows:
                    await self.route_awaiting(Event.from_row(row))
            total += len(rows)
            if len(rows) < self.batch:
                break
        if total == 0:
            self.metrics.log_lag.set(0)
        return total

    async def _read(self) -> list[DictRow]:
        """The next events after ``position``, on the reader's own connection."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(
                    self.db.url, autocommit=True, row_factory=dict_row
                )
            cur = await self._conn.execute(
                queries.load()["events_after"], {"after": self.position, "limit": self.batch}
            )
            return await cur.fetchall()
        except (psycopg.Error, OSError):
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error, OSError):
                    await self._conn.close()
                self._conn = None
            raise

    async def route_all(self, events: list[Event]) -> None:
        """Route events in order. When one read brought several (the reader is behind),
        the transports may write each connection's frames of the batch together: one
        system call per recipient instead of one per frame."""
        batched = len(events) >= BATCH_FROM
        if batched:
            self.router.begin_batch()
        try:
            for event in events:
                self._advance(event)
                if self.on_principal is not None and is_principal_change(event):
                    self.on_principal(event)
                started = time.perf_counter()
                outcomes, blocked = self.router.route_collecting(event)
                if blocked:
                    if batched:  # write what was gathered before waiting for anyone
                        self.router.end_batch()
                    await self._wait_for_room(event, blocked, outcomes)
                    if batched:
                        self.router.begin_batch()
                self._routed(event, outcomes, started)
        finally:
            if batched:
                self.router.end_batch()

    async def route(self, event: Event) -> None:
        """Route one event (``route_all`` of one)."""
        await self.route_all([event])

    async def _wait_for_room(
        self, event: Event, blocked: list[Subscription], outcomes: dict[str, int]
    ) -> None:
        """For recipients whose queue was full, wait for room (up to
        ``slow_consumer_seconds``) before the next event. A client that reads promptly
        survives a burst larger than its queue; one that does not is closed as a slow
        consumer (and resumes from its cursor). Order is kept for all."""
        for sub in blocked:
            outcome = await self.router.deliver_wait(sub, event, self.slow_consumer_seconds)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    async def route_awaiting(self, event: Event) -> None:
        """Route with ``route_async`` (set): the same bookkeeping as ``route``."""
        assert self.route_async is not None
        self._advance(event)
        if self.on_principal is not None and is_principal_change(event):
            self.on_principal(event)
        started = time.perf_counter()
        outcomes = await self.route_async(event)
        self._routed(event, outcomes, started)

    def _advance(self, event: Event) -> None:
        if event.id != self.position + 1 and self.position:
            # Ids are contiguous among committed events; a hole means pruning raced us.
            # Nobody can tell whom the lost events were for: every subscriber is told
            # to re-sync (``on_gap``) rather than left with a history it thinks whole.
            self.metrics.not_delivered.labels("log_gap").inc(event.id - self.position - 1)
            log.warning("event_log_gap", after=self.position, next=event.id)
            if self.on_gap is not None:
                self.on_gap(self.position, event.id)
        self.position = event.id
        self.metrics.events_read.inc()
        self.metrics.commit_to_read.observe(max(time.time() - event.at_ts, 0.0))

    def _routed(self, event: Event, outcomes: Mapping[str, int], started: float) -> None:
        self.routed = event.id
        self.metrics.route_seconds.observe(time.perf_counter() - started)
        lag = (datetime.now(UTC) - event.at).total_seconds()
        self.metrics.log_lag.set(max(lag, 0.0))
        self.metrics.position.set(event.id)
        self.metrics.count(outcomes, "router")

    async def _listen(self, stop: asyncio.Event, loops: Loops) -> None:
        # Without it the reader still polls (every poll_interval), only later.
        health = loops.register(
            "realtime-listener",
            stale_after=stale_after_for(LISTEN_TIMEOUT),
            event="event_log_listen_failed",
        )
        while not stop.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(self.db.url, autocommit=True)
                async with conn:
                    await conn.execute(f"listen {CHANNEL}")
                    self.metrics.statements("listen")
                    self._wake.set()  # catch up on anything missed while not listening
                    while not stop.is_set():
                        health.ok()
                        heard = False
                        async for _ in conn.notifies(timeout=LISTEN_TIMEOUT, stop_after=1):
                            self._wake.set()
                            heard = True
                        # Liveness, only after 5 s of silence: a notification just proved
                        # the connection alive, and a query after each one cost the
                        # database a statement per committing transaction.
                        if not heard:
                            await conn.execute("select 1")
                            self.metrics.statements("listen")
            except Exception as exc:
                health.failed(exc)
                await asyncio.sleep(1.0)


async def load_column_types(
    db: Database, tables: list[str]
) -> tuple[dict[str, dict[str, str]], dict[str, list[dict[str, str]]]]:
    """Per table: column name -> pg type name, and the `columns` list clients expect."""
    async with db.as_service() as tx:
        rows = await tx.all("column_types", {"tables": tables})
    types: dict[str, dict[str, str]] = {t: {} for t in tables}
    columns: dict[str, list[dict[str, str]]] = {t: [] for t in tables}
    for row in rows:
        types[row["table_name"]][row["name"]] = row["type"]
        columns[row["table_name"]].append({"name": row["name"], "type": row["type"]})
    return types, columns


def event_summary(event: Event) -> Mapping[str, Any]:
    return {"id": event.id, "table": event.table, "type": event.type, "row_id": event.row_id}
