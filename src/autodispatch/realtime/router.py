"""The router: which subscriber gets which event.

Subscriptions are indexed by (table, visibility key). For an event, the candidates are
the subscriptions under the event's old and new keys for its table, so the work per
event grows with its recipients, not with the number of connections. Each candidate's
decision is ``Event.variant_for`` (the RLS rule on stored keys, then the binding's
filter), and each event's ``data`` is encoded once per variant and shared.

Bindings of one channel may need different variants of one event (a ``status=eq.queued``
list needs a DELETE when a request is accepted, an unfiltered binding the UPDATE).
realtime-js calls a binding only for frames whose ``data.type`` it wants, so each variant
goes out as its own frame listing exactly the bindings that want it (a ``Part``).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import structlog

from autodispatch.realtime.events import Event, Variant
from autodispatch.realtime.protocol import Filter

log = structlog.get_logger("autodispatch.realtime")


@dataclass(frozen=True, slots=True)
class Binding:
    """One `postgres_changes` entry of a channel."""

    id: int
    table: str
    event: str  # '*', 'INSERT', 'UPDATE', 'DELETE'
    filter: Filter | None = None
    schema: str = "public"

    def wants(self, delivered_type: str) -> bool:
        return self.event == "*" or self.event == delivered_type


class Batching(Protocol):
    """Told when the reader routes several events in a row, so that a transport may
    gather each connection's frames and write them together at ``end``."""

    def begin(self) -> None: ...

    def end(self) -> None: ...


class Sink(Protocol):
    """Where a subscription's events go (a WebSocket channel, an SSE stream)."""

    def offer(self, event: Event, ids: tuple[int, ...], data_json: str) -> bool:
        """Queue one event without waiting; False when there is no room (nothing else)."""
        ...

    async def wait_offer(
        self, event: Event, ids: tuple[int, ...], data_json: str, timeout: float
    ) -> bool:
        """Queue one event, waiting up to ``timeout`` for room; False if none came."""
        ...

    def close(self, reason: str) -> None:
        """Close the connection behind this sink, saying why."""
        ...


class Part(NamedTuple):
    """One frame of an event for one subscription: a variant and the bindings wanting it."""

    variant: Variant
    ids: tuple[int, ...]


class Decision(NamedTuple):
    """What one subscription gets of one event (made for every candidate: a tuple).

    When delivered, ``parts`` holds one ``Part`` per distinct variant the bindings need,
    in the order of the first binding wanting each; every binding is in at most one."""

    delivered: bool
    reason: str  # 'delivered' or why not
    parts: tuple[Part, ...] = ()


@dataclass(eq=False, slots=True)
class Subscription:
    keys: frozenset[str]
    bindings: tuple[Binding, ...]
    sink: Sink
    transport: str
    cursor: int = 0  # the last event id delivered (or skipped) for this subscription
    buffering: bool = False  # while a resume replays, or a change of its keys is applied
    buffer: list[Event] = field(default_factory=list)
    user_id: str | None = None  # whose keys these are (None: anonymous)
    # The keys it is filed under in the router's index: ``keys``, or more of them while a
    # change of its keys is being applied (events after the change are collected too).
    indexed: frozenset[str] = field(default=frozenset())
    # When a queue filled in the middle of an event's parts: that event's id and how many
    # of its parts were queued, so that the retry sends only the rest.
    partial_event: int = 0
    partial_parts: int = 0
    tables: frozenset[str] = field(init=False)  # of the bindings (asked for every event)
    # The one unfiltered binding of a table that has just one (most subscriptions), with
    # its decision for each variant made in advance: the router decides for it without
    # the general loop of decide_bindings, and without allocating.
    plain: dict[str, tuple[Binding, dict[Variant, Decision]]] = field(init=False)

    def __post_init__(self) -> None:
        self.tables = frozenset(b.table for b in self.bindings)
        self.plain = {}
        for table in self.tables:
            of_table = [b for b in self.bindings if b.table == table]
            if len(of_table) == 1 and of_table[0].filter is None:
                b = of_table[0]
                ids = (b.id,)
                self.plain[table] = (
                    b,
                    {v: Decision(True, "delivered", (Part(v, ids),)) for v in Variant},
                )


TableTypes = Mapping[str, Mapping[str, str]]
_NOT_SUBSCRIBED = Decision(False, "table_not_subscribed")
_NOT_VISIBLE = Decision(False, "not_visible")
_EVENT_TYPE_MISMATCH = Decision(False, "event_type_mismatch")
_NO_TYPES: Mapping[str, str] = {}
_NO_COLUMNS: list[dict[str, str]] = []


def decide(sub: Subscription, event: Event, types: TableTypes) -> Decision:
    """What this subscription gets of this event, and why not when nothing."""
    if event.table not in sub.tables:
        return _NOT_SUBSCRIBED
    # Event.variant_for, with the two overlaps computed once for every binding.
    new_visible = not sub.keys.isdisjoint(event.new_keys)
    old_visible = not sub.keys.isdisjoint(event.old_keys)
    if not (new_visible or old_visible):
        return _NOT_VISIBLE
    plain = sub.plain.get(event.table)
    if plain is not None:  # decide_bindings for one binding without a filter
        binding, decisions = plain
        variant = event.variant_given(new_visible, old_visible, None, _NO_TYPES)
        if variant is None:
            return _NOT_VISIBLE
        if binding.event != "*" and binding.event != event.delivered_type(variant):
            return _EVENT_TYPE_MISMATCH
        return decisions[variant]
    table_types = types.get(event.table, _NO_TYPES)
    return decide_bindings(
        sub, event, lambda f: event.variant_given(new_visible, old_visible, f, table_types)
    )


def decide_bindings(
    sub: Subscription, event: Event, variant: Callable[[Filter | None], Variant | None]
) -> Decision:
    """Apply the subscription's bindings (filters, event types) to a visible event.

    ``variant(filter)`` says what the subscriber gets with that filter; the key router and
    the SQL baseline differ only in how it decides visibility. Each binding gets what it
    would get alone on its channel: the ids are grouped by variant, one part each.
    """
    wanting: dict[Variant, list[int]] = {}
    reason = "not_visible"
    for binding in sub.bindings:
        if binding.table != event.table:
            continue
        v = variant(binding.filter)
        if v is None:
            if variant(None) is not None:
                reason = "filter_mismatch"
            continue
        if not binding.wants(event.delivered_type(v)):
            reason = "event_type_mismatch"
            continue
        ids = wanting.get(v)
        if ids is None:
            wanting[v] = [binding.id]
        else:
            ids.append(binding.id)
    if not wanting:
        return Decision(False, reason)
    return Decision(True, "delivered", tuple(Part(v, tuple(ids)) for v, ids in wanting.items()))


class Router:
    def __init__(self, types: TableTypes, columns: Mapping[str, list[dict[str, str]]]) -> None:
        self.types = types
        self.columns = columns
        self._index: dict[tuple[str, str], set[Subscription]] = defaultdict(set)
        self.subscriptions: set[Subscription] = set()
        self.batching: list[Batching] = []

    def begin_batch(self) -> None:
        for batching in self.batching:
            batching.begin()

    def end_batch(self) -> None:
        for batching in self.batching:
            batching.end()

    def add(self, sub: Subscription, index: frozenset[str] | None = None) -> None:
        """Register a subscription, filed under its keys (or ``index``, more of them)."""
        self.subscriptions.add(sub)
        self._file(sub, sub.keys if index is None else index)

    def _file(self, sub: Subscription, keys: frozenset[str]) -> None:
        sub.indexed = keys
        for table in sub.tables:
            for key in keys:
                self._index[(table, key)].add(sub)

    def _unfile(self, sub: Subscription) -> None:
        for table in sub.tables:
            for key in sub.indexed:
                bucket = self._index.get((table, key))
                if bucket is not None:
                    bucket.discard(sub)
                    if not bucket:
                        del self._index[(table, key)]

    def remove(self, sub: Subscription) -> None:
        self.subscriptions.discard(sub)
        self._unfile(sub)

    def reindex(self, sub: Subscription, keys: frozenset[str]) -> None:
        """File a registered subscription under these keys instead (it decides with
        ``sub.keys`` all the same: see Hub for when the two differ)."""
        if sub.indexed == keys or sub not in self.subscriptions:
            return
        self._unfile(sub)
        self._file(sub, keys)

    def candidates(self, event: Event) -> set[Subscription]:
        found: set[Subscription] = set()
        for key in event.keys:
            bucket = self._index.get((event.table, key))
            if bucket:
                found |= bucket
        return found

    def route(self, event: Event) -> dict[str, int]:
        """Offer the event to every subscription without waiting; outcomes by reason."""
        outcomes, blocked = self.route_collecting(event)
        if blocked:
            outcomes["queue_full"] += len(blocked)
        return outcomes

    def route_collecting(self, event: Event) -> tuple[dict[str, int], list[Subscription]]:
        """Offer the event to every subscription that may see it, without waiting.

        Returns the outcomes by reason, and the subscriptions whose queue was full: the
        caller waits for room (``deliver_wait``) before routing the next event, so a
        client that reads promptly survives a burst larger than its queue, and one that
        does not is closed as a slow consumer.
        """
        outcomes: dict[str, int] = defaultdict(int)
        blocked: list[Subscription] = []
        for sub in self.candidates(event):
            if sub.buffering:
                sub.buffer.append(event)
                outcomes["buffered"] += 1
                continue
            try:
                outcome = self.deliver(sub, event)
            except Exception:  # a transport's bug: that subscriber alone is closed
                log.exception("sink_failed", event_id=event.id, transport=sub.transport)
                with contextlib.suppress(Exception):
                    sub.sink.close("internal_error")
                outcome = "sink_failed"
            if outcome == "queue_full":
                blocked.append(sub)
            else:
                outcomes[outcome] += 1
        return outcomes, blocked

    def offer(self, sub: Subscription, event: Event, parts: tuple[Part, ...]) -> bool:
        """Queue each part of a delivered event as its own frame, without waiting, and
        move the cursor; False when the queue filled first (the cursor stays put, and the
        parts already queued are remembered: a retry of this event sends only the rest)."""
        done = sub.partial_parts if sub.partial_event == event.id else 0
        columns = self.columns.get(event.table, _NO_COLUMNS)
        last = len(parts) - 1
        while done <= last:
            variant, ids = parts[done]
            frame = event if done == last else event.partial()
            if not sub.sink.offer(frame, ids, frame.encoded(variant, columns)):
                sub.partial_event, sub.partial_parts = event.id, done
                return False
            done += 1
        sub.cursor = event.id
        return True

    async def offer_wait(
        self, sub: Subscription, event: Event, parts: tuple[Part, ...], timeout: float
    ) -> bool:
        """``offer``, waiting up to ``timeout`` for room for each part not yet queued."""
        done = sub.partial_parts if sub.partial_event == event.id else 0
        columns = self.columns.get(event.table, _NO_COLUMNS)
        last = len(parts) - 1
        while done <= last:
            variant, ids = parts[done]
            frame = event if done == last else event.partial()
            if not await sub.sink.wait_offer(frame, ids, frame.encoded(variant, columns), timeout):
                sub.partial_event, sub.partial_parts = event.id, done
                return False
            done += 1
        sub.cursor = event.id
        return True

    def deliver(self, sub: Subscription, event: Event) -> str:
        """Deliver one event to one subscription without waiting; return the outcome.

        On ``queue_full`` the cursor stays put, so the same event can be delivered again
        (its parts that were queued are not sent again).
        """
        if event.id <= sub.cursor:
            return "duplicate"
        decision = decide(sub, event, self.types)
        if not decision.delivered:
            sub.cursor = event.id
            return decision.reason
        if not self.offer(sub, event, decision.parts):
            return "queue_full"
        return "delivered"

    async def deliver_wait(self, sub: Subscription, event: Event, timeout: float) -> str:
        """Deliver one event, waiting up to ``timeout`` for room; close the sink if none came."""
        if event.id <= sub.cursor:
            return "duplicate"
        decision = decide(sub, event, self.types)
        if not decision.delivered:
            sub.cursor = event.id
            return decision.reason
        if not await self.offer_wait(sub, event, decision.parts, timeout):
            if sub in self.subscriptions:  # not a channel left while this waited
                sub.sink.close("slow_consumer")
            return "slow_consumer"
        return "delivered"

    async def deliver_removal_wait(self, sub: Subscription, event: Event, timeout: float) -> bool:
        """Send one removal of a key change (realtime/principals.py), decided with the
        subscription's keys before the change, without moving its cursor (the change's
        own id does that). False when no room came: the sink is then closed."""
        decision = decide(sub, event, self.types)
        if not decision.delivered:
            return True
        columns = self.columns.get(event.table, _NO_COLUMNS)
        for variant, ids in decision.parts:
            if not await sub.sink.wait_offer(event, ids, event.encoded(variant, columns), timeout):
                if sub in self.subscriptions:  # not a channel left while this waited
                    sub.sink.close("slow_consumer")
                return False
        return True

    def explain(self, keys: Iterable[str], event: Event, binding: Binding | None = None) -> str:
        """A sentence saying whether a principal with these keys gets the event, and why."""
        principal = frozenset(keys)
        sub = Subscription(
            keys=principal,
            bindings=(binding or Binding(id=0, table=event.table, event="*"),),
            sink=NullSink(),
            transport="explain",
        )
        decision = decide(sub, event, self.types)
        if decision.delivered:  # one binding: one part
            shared = sorted(principal & (event.new_keys | event.old_keys))
            removal = decision.parts[0].variant is Variant.REMOVAL
            kind = "a removal (DELETE)" if removal else event.type
            return f"delivered as {kind}: the principal holds {', '.join(shared)}"
        return (
            f"not delivered ({decision.reason}): the row's keys are new {sorted(event.new_keys)}"
            f" / old {sorted(event.old_keys)}; the principal holds {sorted(principal)}"
        )


class NullSink:
    """A sink that takes everything and sends nothing (for explanations)."""

    def offer(self, event: Event, ids: tuple[int, ...], data_json: str) -> bool:
        return True

    async def wait_offer(
        self, event: Event, ids: tuple[int, ...], data_json: str, timeout: float
    ) -> bool:
        return True

    def close(self, reason: str) -> None:
        pass
