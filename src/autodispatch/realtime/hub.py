"""The realtime service of one process: the reader, the router, subscriptions, resume.

Transports (SSE, the Supabase WebSocket) call ``subscribe`` with the principal's keys
and bindings and a sink; the hub registers the subscription in the router before it
returns, so a transport that says "subscribed" afterwards is telling the truth. A client
resuming from a cursor is then sent what it missed by ``catch_up``, which the transport
runs once it is writing to the client: the replay waits for room as the client reads, so
a backlog of any size arrives, in order, once, followed by what committed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
import structlog

from autodispatch.db.database import Database
from autodispatch.domain.errors import Conflict
from autodispatch.domain.principal import Principal
from autodispatch.realtime.baseline import PerSubscriberSqlRouter
from autodispatch.realtime.events import Event
from autodispatch.realtime.log import TX_STATEMENTS, EventLogReader, load_column_types
from autodispatch.realtime.metrics import RealtimeMetrics
from autodispatch.realtime.router import Binding, Router, Sink, Subscription

log = structlog.get_logger("autodispatch.realtime")

REALTIME_TABLES = (
    "sessions",
    "session_assignments",
    "feature_flags",
    "session_messages",
    "probe_pings",
)
# How the reader decides who gets an event: "keys" (the router's visibility-key index), or
# "per_subscriber_sql", the slower hosted-service method kept as the baseline of
# `autodispatch bench realtime` (realtime/baseline.py). Both deliver the same events.
ROUTING_STRATEGIES = ("keys", "per_subscriber_sql")


class ResyncRequired(Conflict):
    """The events after your cursor are no longer all kept; reload your data, then subscribe."""

    default_code = "resync_required"


@dataclass(frozen=True)
class RealtimeSettings:
    poll_interval: float = 0.25
    retention_seconds: int = 7 * 24 * 3600
    prune_interval: float = 3600.0
    queue_size: int = 1000
    routing: str = "keys"  # one of ROUTING_STRATEGIES
    replay_page: int = 1000  # events read per statement when a subscriber resumes


def _pruned(cursor: int, pruned_through: int) -> str:
    return (
        f"events after {cursor} were pruned (kept: after {pruned_through});"
        " reload your data, then subscribe without a cursor"
    )


class Hub:
    def __init__(self, db: Database, metrics: RealtimeMetrics, settings: RealtimeSettings) -> None:
        self.db = db
        self.metrics = metrics
        self.settings = settings
        self.router = Router({}, {})
        self.reader = EventLogReader(db, self.router, metrics, poll_interval=settings.poll_interval)
        if settings.routing not in ROUTING_STRATEGIES:
            raise ValueError(
                f"routing must be one of {ROUTING_STRATEGIES}, not {settings.routing!r}"
            )
        if settings.routing == "per_subscriber_sql":
            # Benchmark baseline only: one SQL query per subscriber per event.
            baseline = PerSubscriberSqlRouter(
                db, self.router, metrics, lambda: self.reader.slow_consumer_seconds
            )
            self.reader.route_async = baseline.route
        self.reader.on_gap = self._resync_everyone
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    async def start(self) -> None:
        types, columns = await load_column_types(self.db, list(REALTIME_TABLES))
        self.router.types = types
        self.router.columns = columns
        self._tasks = [
            asyncio.create_task(self.reader.run(self._stop), name="realtime-reader"),
            asyncio.create_task(self._prune_forever(), name="realtime-prune"),
        ]
        await asyncio.wait_for(self.reader.started.wait(), timeout=30)

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def tables(self) -> tuple[str, ...]:
        return REALTIME_TABLES

    async def keys_for(self, principal: Principal) -> frozenset[str]:
        """The principal's visibility keys, from the same SQL function RLS uses."""
        if principal.user_id is None:
            return frozenset({"public"})
        return await self.keys_for_user(principal.user_id)

    async def keys_for_user(self, user_id: UUID) -> frozenset[str]:
        async with self.db.as_service() as tx:
            keys = await tx.value("principal_keys_for", {"user_id": user_id})
        self.metrics.statements("principal_keys", TX_STATEMENTS)
        return frozenset(keys or ["public"])

    async def subscribe(
        self,
        keys: frozenset[str],
        bindings: tuple[Binding, ...],
        sink: Sink,
        transport: str,
        resume_from: int | None = None,
    ) -> Subscription:
        """Register a subscription. A cursor is checked here (``ResyncRequired`` before
        anything is registered); the events after it are sent by ``catch_up``, which the
        transport runs once its client is reading: a backlog larger than the queue then
        drains as the client reads, instead of filling a queue nobody empties yet."""
        sub = Subscription(keys=keys, bindings=bindings, sink=sink, transport=transport)
        if resume_from is None:
            sub.cursor = self.reader.position
            self.router.add(sub)
            self.metrics.subscribers.labels(transport).inc()
            return sub
        last_id, pruned_through = await self.reader.head()
        if resume_from < pruned_through:
            raise ResyncRequired(_pruned(resume_from, pruned_through))
        if resume_from > last_id:
            raise ResyncRequired(
                f"cursor {resume_from} is ahead of this log (last event {last_id});"
                " it belongs to another database: reload and subscribe without a cursor"
            )
        sub.cursor = resume_from
        sub.buffering = True  # live events wait in sub.buffer until catch_up has replayed
        self.router.add(sub)
        self.metrics.subscribers.labels(transport).inc()
        return sub

    async def catch_up(self, sub: Subscription) -> None:
        """Send a resuming subscription what it missed, then what arrived meanwhile, in
        order and once each; then it is live. Waits for room as the client reads (a
        client that stops reading is closed as a slow consumer). When the log is pruned
        past the cursor during the replay, the sink is closed with ``resync_required``:
        a partial history is never sent as a whole one."""
        if not sub.buffering:
            return
        try:
            complete = await self._replay(sub, sub.cursor)
        except ResyncRequired:
            sub.sink.close("resync_required")
            complete = False
        except Exception as exc:  # the client resumes from its cursor, nothing is lost
            log.warning("resume_replay_failed", error=str(exc), cursor=sub.cursor)
            sub.sink.close("replay_failed")
            complete = False
        if not complete:
            self.unsubscribe(sub)
            return
        self.metrics.count(
            await self.router.finish_replay_wait(sub, self.reader.slow_consumer_seconds),
            sub.transport,
        )

    async def _replay(self, sub: Subscription, after: int) -> bool:
        """Replay the log after ``after`` page by page; False when the sink closed."""
        page = self.settings.replay_page
        while True:
            async with self.db.as_service() as tx:
                rows = await tx.all(
                    "events_for_keys_after",
                    {
                        "after": after,
                        "tables": sorted(sub.tables),
                        "keys": sorted(sub.keys),
                        "limit": page,
                    },
                )
            self.metrics.statements("replay", TX_STATEMENTS)
            pruned_through = int(rows[0]["pruned_through"])
            if after < pruned_through:
                raise ResyncRequired(_pruned(after, pruned_through))
            events = [Event.from_row(row) for row in rows if row["id"] is not None]
            for event in events:
                outcome = await self.router.deliver_wait(
                    sub, event, self.reader.slow_consumer_seconds
                )
                if outcome == "slow_consumer":
                    return False
                if outcome not in ("delivered", "duplicate"):
                    self.metrics.count({outcome: 1}, sub.transport)
            if len(events) < page:
                return True
            after = events[-1].id

    def _resync_everyone(self, last_read: int, next_read: int) -> None:
        """Events between these ids are gone before this reader routed them: no
        subscriber's history is whole any more. Each is closed with ``resync_required``
        and resumes from its cursor, which the resume then refuses if it is pruned."""
        log.warning("subscribers_told_to_resync", after=last_read, next=next_read)
        for sub in list(self.router.subscriptions):
            self.unsubscribe(sub)
            sub.sink.close("resync_required")

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self.router.subscriptions:
            self.router.remove(sub)
            self.metrics.subscribers.labels(sub.transport).dec()

    async def event(self, event_id: int) -> Event | None:
        async with self.db.as_service() as tx:
            row = await tx.one("event_by_id", {"id": event_id})
        self.metrics.statements("event_by_id", TX_STATEMENTS)
        return Event.from_row(row) if row else None

    async def _prune_forever(self) -> None:
        while not self._stop.is_set():
            try:
                async with self.db.as_service() as tx:
                    pruned = await tx.value(
                        "prune_events", {"keep_seconds": self.settings.retention_seconds}
                    )
                self.metrics.statements("prune", TX_STATEMENTS)
                if pruned:
                    log.info("events_pruned", count=pruned)
            except (psycopg.Error, OSError) as exc:
                log.warning("event_prune_failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.settings.prune_interval)


class QueueSink:
    """A bounded queue of frames for one connection. When it stays full longer than the
    reader will wait, the client is too slow: the sink closes (reason ``slow_consumer``)
    and the client resumes from its cursor."""

    def __init__(self, maxsize: int, render: Callable[[Event, tuple[int, ...], str], Any]) -> None:
        self.queue: asyncio.Queue[tuple[Event | None, Any]] = asyncio.Queue(maxsize)
        self.render = render
        self.closed_reason: str | None = None

    def offer(self, event: Event, ids: tuple[int, ...], data_json: str) -> bool:
        """Queue without waiting; False when full (the reader then waits, see log.py)."""
        if self.closed_reason is not None:
            return False
        try:
            self.queue.put_nowait((event, self.render(event, ids, data_json)))
        except asyncio.QueueFull:
            return False
        return True

    async def wait_offer(
        self, event: Event, ids: tuple[int, ...], data_json: str, timeout: float
    ) -> bool:
        if self.closed_reason is not None:
            return False
        try:
            await asyncio.wait_for(
                self.queue.put((event, self.render(event, ids, data_json))), timeout
            )
        except TimeoutError:
            return False
        return self.closed_reason is None

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            # Wake the writer even when the queue is full.
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait((None, None))


async def drain(
    sink: QueueSink,
    write: Callable[[Any], Awaitable[None]],
    *,
    keepalive: float,
    ping: Any,
    on_sent: Callable[[Event], None],
) -> str:
    """Write queued frames until the sink closes; return the reason.

    Once the sink is closed (a slow client, an expired token, shutdown) nothing more is
    written: the client's cursor is the last event it received, and it resumes there.
    """
    while sink.closed_reason is None:
        try:
            event, frame = await asyncio.wait_for(sink.queue.get(), timeout=keepalive)
        except TimeoutError:
            await write(ping)
            continue
        if event is None or sink.closed_reason is not None:
            break
        await write(frame)
        on_sent(event)
    return sink.closed_reason or "closed"
