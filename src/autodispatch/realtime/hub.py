"""The realtime service of one process: the reader, the router, subscriptions, resume.

Transports (SSE, the Supabase WebSocket) call ``subscribe`` with the principal's keys
and bindings and a sink; the hub registers the subscription in the router before it
returns, so a transport that says "subscribed" afterwards is telling the truth. A client
resuming from a cursor is then sent what it missed by ``catch_up``, which the transport
runs once it is writing to the client: the replay waits for room as the client reads, so
a backlog of any size arrives, in order, once, followed by what committed meanwhile.

Why one module of ~450 lines: subscribing, catching up and re-keying a subscription when
its user's keys change each hold the others' invariant (registered before "subscribed";
replayed, then live, with nothing between; a key change applied in its place among the
events), through the same subscription, router and reader position; apart, each step's
reason would be in another file. What has no share in them (reading the log, routing,
the transports) is elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from dataclasses import dataclass
from uuid import UUID

import structlog

from autodispatch.background import Loops
from autodispatch.db.database import Database
from autodispatch.db.sequencer import BATCH as SEQUENCE_BATCH
from autodispatch.db.sequencer import Sequencer
from autodispatch.domain.errors import Conflict
from autodispatch.domain.principal import Principal
from autodispatch.realtime.baseline import PerSubscriberSqlRouter
from autodispatch.realtime.events import Event
from autodispatch.realtime.log import TX_STATEMENTS, EventLogReader, load_column_types
from autodispatch.realtime.metrics import RealtimeMetrics
from autodispatch.realtime.principals import (
    MAX_REMOVALS,
    KeyChange,
    is_principal_change,
    removals,
)
from autodispatch.realtime.router import Binding, Router, Sink, Subscription

log = structlog.get_logger("autodispatch.realtime")

REALTIME_TABLES = (
    "sessions",
    "session_assignments",
    "feature_flags",
    "session_messages",
    "probe_pings",
)
# Reads of a subscriber's keys before giving up while changes of them keep committing.
KEYS_ATTEMPTS = 5
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
    # How often the sequencer looks for events committed by SQL from elsewhere.
    sequence_poll_interval: float = 0.05
    # The least time between the starts of two numbering runs (coalescing under load).
    sequence_spacing: float = 0.002


def _pruned(cursor: int, pruned_through: int) -> str:
    return (
        f"events after {cursor} were pruned (kept: after {pruned_through});"
        " reload your data, then subscribe without a cursor"
    )


class Hub:
    def __init__(
        self,
        db: Database,
        metrics: RealtimeMetrics,
        settings: RealtimeSettings,
        loops: Loops | None = None,
    ) -> None:
        self.loops = loops if loops is not None else Loops()  # watched by /readyz
        self.db = db
        self.metrics = metrics
        self.settings = settings
        self.router = Router({}, {})
        self.reader = EventLogReader(db, self.router, metrics, poll_interval=settings.poll_interval)
        # Gives committed events their ids; the app pokes it after each writing commit
        # (Database.on_write_commit), and it wakes this process's reader at once.
        self.sequencer = Sequencer(
            db.url,
            poll_interval=settings.sequence_poll_interval,
            spacing=settings.sequence_spacing,
            on_sequenced=self._sequenced,
        )
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
        self.reader.on_principal = self._principal_changed
        self._by_user: defaultdict[str, set[Subscription]] = defaultdict(set)
        self._rekeying: set[asyncio.Task[None]] = set()
        self._resuming: set[Subscription] = set()  # registered; catch_up not yet begun
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    def _sequenced(self, count: int, last_id: int) -> None:
        self.metrics.sequenced.inc(count)
        self.reader.wake()

    async def start(self) -> None:
        types, columns = await load_column_types(self.db, list(REALTIME_TABLES))
        self.router.types = types
        self.router.columns = columns
        self._tasks = [
            asyncio.create_task(
                self.sequencer.run(self._stop, self.loops), name="realtime-sequencer"
            ),
            asyncio.create_task(self.reader.run(self._stop, self.loops), name="realtime-reader"),
            asyncio.create_task(
                self.loops.run_forever(
                    "realtime-prune",
                    self._prune_once,
                    interval=self.settings.prune_interval,
                    stop=self._stop,
                    event="event_prune_failed",
                ),
                name="realtime-prune",
            ),
        ]
        await asyncio.wait_for(self.reader.started.wait(), timeout=30)

    async def stop(self) -> None:
        self._stop.set()
        for task in [*self._tasks, *self._rekeying]:
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
        principal: Principal,
        bindings: tuple[Binding, ...],
        sink: Sink,
        transport: str,
        resume_from: int | None = None,
    ) -> Subscription:
        """Register a subscription with the principal's keys. A cursor is checked here
        (``ResyncRequired`` before anything is registered); the events after it are sent
        by ``catch_up``, which the transport runs once its client is reading: a backlog
        larger than the queue then drains as the client reads, instead of filling a queue
        nobody empties yet.

        The keys are read with the log's head in one statement and the subscription is
        registered at or after that head, so no change of the keys can fall between what
        they say and the first event routed to it (such a change is an event after it)."""
        user_id: str | None = None
        head: int | None = None
        if principal.user_id is None:
            keys = frozenset({"public"})
        else:
            user_id = str(principal.user_id)
            keys, head = await self._keys_and_head(principal.user_id)
        sub = Subscription(
            keys=keys, bindings=bindings, sink=sink, transport=transport, user_id=user_id
        )
        if resume_from is None and (head is None or head >= self.reader.position):
            # From the keys' snapshot on: changes of the keys up to it are in them already
            # (a reader lagging behind it must not apply them a second time).
            sub.cursor = self.reader.position if head is None else head
            self._add(sub)
            return sub
        if resume_from is None:
            # The reader is past the keys' snapshot: replay from there (a few events).
            assert head is not None
            resume_from = head
        last_id, pruned_through = await self.reader.head()
        if resume_from < pruned_through:
            raise ResyncRequired(_pruned(resume_from, pruned_through))
        if resume_from > last_id:
            raise ResyncRequired(
                f"cursor {resume_from} is ahead of this log (last event {last_id});"
                " it belongs to another database: reload and subscribe without a cursor"
            )
        if user_id is not None:
            changes = await self._key_changes(user_id, resume_from)
            if changes:  # replayed with the keys of the time, switched where they changed,
                sub.keys = changes[0].old  # with removals for what left the view there
        sub.cursor = resume_from
        sub.buffering = True  # live events wait in sub.buffer until catch_up has replayed
        self._add(sub, index=keys | sub.keys)
        self._resuming.add(sub)
        return sub

    def needs_catch_up(self, sub: Subscription) -> bool:
        """Whether the transport must run ``catch_up`` for this new subscription."""
        return sub in self._resuming

    async def _keys_and_head(self, user_id: UUID) -> tuple[frozenset[str], int]:
        for _ in range(KEYS_ATTEMPTS):
            async with self.db.as_service() as tx:
                row = await tx.one("principal_keys_and_head", {"user_id": user_id})
            self.metrics.statements("principal_keys", TX_STATEMENTS)
            assert row is not None
            if not row["pending"]:
                return frozenset(row["keys"] or ["public"]), int(row["head"])
            # A change of these keys committed and has no id yet: number it, read again.
            async with self.db.as_service() as tx:
                await tx.one("sequence_events", {"limit": SEQUENCE_BATCH})
            self.metrics.statements("principal_keys", TX_STATEMENTS)
        raise ResyncRequired("what you may see keeps changing; wait a moment, then subscribe again")

    async def _key_changes(self, user_id: str, after: int) -> list[KeyChange]:
        async with self.db.as_service() as tx:
            rows = await tx.all("principal_changes_after", {"user_id": user_id, "after": after})
        self.metrics.statements("principal_keys", TX_STATEMENTS)
        return [KeyChange.from_row(row) for row in rows]

    def _add(self, sub: Subscription, index: frozenset[str] | None = None) -> None:
        self.router.add(sub, index)
        if sub.user_id is not None:
            self._by_user[sub.user_id].add(sub)
        self.metrics.subscribers.labels(sub.transport).inc()

    async def catch_up(self, sub: Subscription) -> None:
        """Send a resuming subscription what it missed, then what arrived meanwhile, in
        order and once each; then it is live. Waits for room as the client reads (a
        client that stops reading is closed as a slow consumer). When the log is pruned
        past the cursor during the replay, the sink is closed with ``resync_required``:
        a partial history is never sent as a whole one."""
        if sub not in self._resuming:
            return
        self._resuming.discard(sub)
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
        await self._drain(sub)

    async def _drain(self, sub: Subscription) -> None:
        """Deliver what a buffering subscription collected meanwhile, in order, applying
        any change of its keys in its place; then it is live, indexed by its keys alone.
        Events routed while this waits join the buffer, so order is kept."""
        outcomes: dict[str, int] = defaultdict(int)
        timeout = self.reader.slow_consumer_seconds
        try:
            while sub.buffer:
                event = sub.buffer.pop(0)
                if sub not in self.router.subscriptions:
                    return  # unsubscribed meanwhile: send nothing more
                if is_principal_change(event):
                    if not await self._apply_key_change(sub, event):
                        self.unsubscribe(sub)
                        return
                    continue
                outcome = await self.router.deliver_wait(sub, event, timeout)
                if outcome == "slow_consumer":
                    self.unsubscribe(sub)
                    return
                outcomes[outcome] += 1
        except ResyncRequired:
            sub.sink.close("resync_required")
            self.unsubscribe(sub)
            return
        except Exception as exc:  # the client resumes from its cursor, nothing is lost
            log.warning("key_change_failed", error=str(exc), cursor=sub.cursor)
            sub.sink.close("replay_failed")
            self.unsubscribe(sub)
            return
        sub.buffering = False
        self.router.reindex(sub, sub.keys)
        self.metrics.count(outcomes, sub.transport)

    def _principal_changed(self, event: Event) -> None:
        """The reader met a change of one user's keys: from here on, that user's
        subscriptions buffer until the change is applied (removals first), in order."""
        subs = self._by_user.get(event.row_id)
        if not subs:
            return
        change = KeyChange.of(event)
        for sub in list(subs):
            if event.id <= sub.cursor:
                continue
            # Events after this one are candidates under the new keys too, until applied.
            self.router.reindex(sub, sub.indexed | change.new)
            sub.buffer.append(event)
            if not sub.buffering:
                sub.buffering = True
                task = asyncio.get_running_loop().create_task(
                    self._drain(sub), name="realtime-rekey"
                )
                self._rekeying.add(task)
                task.add_done_callback(self._rekeying.discard)

    async def _apply_key_change(self, sub: Subscription, event: Event) -> bool:
        """Send the removals of one key change, then decide with the new keys. False when
        the sink closed meanwhile (a slow consumer). ``ResyncRequired`` when more rows
        left the view than are worth sending one by one."""
        if event.id <= sub.cursor:
            return True
        change = KeyChange.of(event)
        lost = sub.keys - change.new
        if lost:
            async with self.db.as_service() as tx:
                rows = await tx.all(
                    "rows_leaving_view",
                    {
                        "tables": sorted(sub.tables),
                        "at": event.id,
                        "had": sorted(sub.keys),
                        "has": sorted(change.new),
                        "limit": MAX_REMOVALS + 1,
                    },
                )
            self.metrics.statements("principal_keys", TX_STATEMENTS)
            if len(rows) > MAX_REMOVALS:
                raise ResyncRequired(
                    f"what you may see changed at event {event.id}, and more than"
                    f" {MAX_REMOVALS} rows left your view; reload your data, then subscribe"
                    " without a cursor"
                )
            for removal in removals(event, rows):
                if sub not in self.router.subscriptions:
                    return False  # left meanwhile: nothing more for it
                if not await self.router.deliver_removal_wait(
                    sub, removal, self.reader.slow_consumer_seconds
                ):
                    return False
        log.info(
            "subscriber_rekeyed",
            user_id=sub.user_id,
            event_id=event.id,
            lost=sorted(lost),
            gained=sorted(change.new - sub.keys),
        )
        sub.keys = change.new
        sub.cursor = event.id
        if sub.buffering:  # live events the new keys let in must be collected from now on
            self.router.reindex(sub, sub.indexed | change.new)
        return True

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
                        "keys": sorted(sub.keys | sub.indexed),
                        "user_id": sub.user_id,
                        "limit": page,
                    },
                )
            self.metrics.statements("replay", TX_STATEMENTS)
            pruned_through = int(rows[0]["pruned_through"])
            if after < pruned_through:
                raise ResyncRequired(_pruned(after, pruned_through))
            events = [Event.from_row(row) for row in rows if row["id"] is not None]
            for event in events:
                if sub not in self.router.subscriptions:
                    return False  # unsubscribed meanwhile: send nothing more
                if is_principal_change(event):
                    if not await self._apply_key_change(sub, event):
                        return False
                    # The rest of this page was chosen with the old keys: rows that the
                    # new ones let in would be missing. Read on from here with the new.
                    after = event.id
                    break
                outcome = await self.router.deliver_wait(
                    sub, event, self.reader.slow_consumer_seconds
                )
                if outcome == "slow_consumer":
                    return False
                if outcome not in ("delivered", "duplicate"):
                    self.metrics.count({outcome: 1}, sub.transport)
            else:
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
        self._resuming.discard(sub)
        if sub in self.router.subscriptions:
            self.router.remove(sub)
            self.metrics.subscribers.labels(sub.transport).dec()
        if sub.user_id is not None:
            subs = self._by_user.get(sub.user_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_user[sub.user_id]

    async def event(self, event_id: int) -> Event | None:
        async with self.db.as_service() as tx:
            row = await tx.one("event_by_id", {"id": event_id})
        self.metrics.statements("event_by_id", TX_STATEMENTS)
        return Event.from_row(row) if row else None

    async def _prune_once(self) -> None:
        async with self.db.as_service() as tx:
            pruned = await tx.value(
                "prune_events", {"keep_seconds": self.settings.retention_seconds}
            )
        self.metrics.statements("prune", TX_STATEMENTS)
        if pruned:
            log.info("events_pruned", count=pruned)
