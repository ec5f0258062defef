"""The event log reader: one per process, reading the log in order and routing each event.

NOTIFY wakes it (on its own autocommit connection, STYLE.md); a short timer covers what
NOTIFY cannot (a notification lost while the connection was down). It starts at the
log's head: subscribers that need older events resume from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog

from autodispatch.db.database import Database
from autodispatch.realtime.events import Event
from autodispatch.realtime.metrics import RealtimeMetrics
from autodispatch.realtime.router import Router

log = structlog.get_logger("autodispatch.realtime")

CHANNEL = "autodispatch_events"


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
        self.position = 0  # the highest event id read and routed
        self.started = asyncio.Event()
        self._wake = asyncio.Event()

    async def head(self) -> tuple[int, int]:
        async with self.db.as_service() as tx:
            row = await tx.one("stream_head")
        assert row is not None
        return int(row["last_id"]), int(row["pruned_through"])

    async def run(self, stop: asyncio.Event) -> None:
        self.position, _ = await self.head()
        self.started.set()
        listener = asyncio.create_task(self._listen(stop), name="realtime-listen")
        try:
            while not stop.is_set():
                try:
                    await self.read_available()
                except (psycopg.Error, OSError) as exc:
                    self.metrics.reader_errors.inc()
                    log.warning("event_log_read_failed", error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)
                self._wake.clear()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def read_available(self) -> int:
        """Read and route everything committed after ``position``; return how many."""
        total = 0
        while True:
            async with self.db.as_service() as tx:
                rows = await tx.all("events_after", {"after": self.position, "limit": self.batch})
            for row in rows:
                self.route(Event.from_row(row))
            total += len(rows)
            if len(rows) < self.batch:
                break
        if total == 0:
            self.metrics.log_lag.set(0)
        return total

    def route(self, event: Event) -> None:
        if event.id != self.position + 1 and self.position:
            # Ids are contiguous among committed events; a hole means pruning raced us.
            self.metrics.not_delivered.labels("log_gap").inc(event.id - self.position - 1)
            log.warning("event_log_gap", after=self.position, next=event.id)
        self.position = event.id
        self.metrics.events_read.inc()
        started = time.perf_counter()
        outcomes = self.router.route(event)
        self.metrics.route_seconds.observe(time.perf_counter() - started)
        lag = (datetime.now(UTC) - event.at).total_seconds()
        self.metrics.log_lag.set(max(lag, 0.0))
        self.metrics.position.set(event.id)
        self.metrics.count(outcomes, "router")

    async def _listen(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(self.db.url, autocommit=True)
                async with conn:
                    await conn.execute(f"listen {CHANNEL}")
                    self._wake.set()  # catch up on anything missed while not listening
                    while not stop.is_set():
                        async for _ in conn.notifies(timeout=5.0, stop_after=1):
                            self._wake.set()
                        await conn.execute("select 1")  # liveness
            except (psycopg.Error, OSError) as exc:
                log.warning("event_log_listen_failed", error=str(exc))
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
