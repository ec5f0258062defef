"""The router: which subscriber gets which event.

Subscriptions are indexed by (table, visibility key). For an event, the candidates are
the subscriptions under the event's old and new keys for its table, so the work per
event grows with its recipients, not with the number of connections. Each candidate's
decision is ``Event.variant_for`` (the RLS rule on stored keys, then the binding's
filter), and each event's ``data`` is encoded once per variant and shared.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from autodispatch.realtime.events import Event, Variant
from autodispatch.realtime.protocol import Filter


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


@dataclass(eq=False, slots=True)
class Subscription:
    keys: frozenset[str]
    bindings: tuple[Binding, ...]
    sink: Sink
    transport: str
    cursor: int = 0  # the last event id delivered (or skipped) for this subscription
    buffering: bool = False  # while a resume replays from the database
    buffer: list[Event] = field(default_factory=list)
    tables: frozenset[str] = field(init=False)  # of the bindings (asked for every event)
    # The one unfiltered binding of a table that has just one (most subscriptions): the
    # router decides for it without the general loop of decide_bindings.
    plain: dict[str, Binding] = field(init=False)

    def __post_init__(self) -> None:
        self.tables = frozenset(b.table for b in self.bindings)
        self.plain = {}
        for table in self.tables:
            of_table = [b for b in self.bindings if b.table == table]
            if len(of_table) == 1 and of_table[0].filter is None:
                self.plain[table] = of_table[0]


class Decision(NamedTuple):
    """What one subscription gets of one event (made for every candidate: a tuple)."""

    delivered: bool
    reason: str  # 'delivered' or why not
    ids: tuple[int, ...] = ()
    variant: Variant | None = None


TableTypes = Mapping[str, Mapping[str, str]]
_NOT_SUBSCRIBED = Decision(False, "table_not_subscribed")
_NOT_VISIBLE = Decision(False, "not_visible")
_EVENT_TYPE_MISMATCH = Decision(False, "event_type_mismatch")
_NO_TYPES: Mapping[str, str] = {}


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
        variant = event.variant_given(new_visible, old_visible, None, _NO_TYPES)
        if variant is None:
            return _NOT_VISIBLE
        if plain.event != "*" and plain.event != event.delivered_type(variant):
            return _EVENT_TYPE_MISMATCH
        return Decision(True, "delivered", (plain.id,), variant)
    table_types = types.get(event.table, _NO_TYPES)
    return decide_bindings(
        sub, event, lambda f: event.variant_given(new_visible, old_visible, f, table_types)
    )


def decide_bindings(
    sub: Subscription, event: Event, variant: Callable[[Filter | None], Variant | None]
) -> Decision:
    """Apply the subscription's bindings (filters, event types) to a visible event.

    ``variant(filter)`` says what the subscriber gets with that filter; the key router and
    the SQL baseline differ only in how it decides visibility.
    """
    ids: list[int] = []
    chosen: Variant | None = None
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
        # Bindings of one channel may disagree only through filters; the first match's
        # variant is the one sent (every matching id is listed).
        chosen = chosen or v
        ids.append(binding.id)
    if chosen is None:
        return Decision(False, reason)
    return Decision(True, "delivered", tuple(ids), chosen)


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

    def add(self, sub: Subscription) -> None:
        self.subscriptions.add(sub)
        for table in sub.tables:
            for key in sub.keys:
                self._index[(table, key)].add(sub)

    def remove(self, sub: Subscription) -> None:
        self.subscriptions.discard(sub)
        for table in sub.tables:
            for key in sub.keys:
                bucket = self._index.get((table, key))
                if bucket is not None:
                    bucket.discard(sub)
                    if not bucket:
                        del self._index[(table, key)]

    def rekey(self, sub: Subscription, keys: frozenset[str]) -> None:
        """A subscriber's keys changed (a refreshed token): move it in the index."""
        self.remove(sub)
        sub.keys = keys
        self.add(sub)

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
            outcome = self.deliver(sub, event)
            if outcome == "queue_full":
                blocked.append(sub)
            else:
                outcomes[outcome] += 1
        return outcomes, blocked

    def _decide_and_encode(self, sub: Subscription, event: Event) -> tuple[Decision, str | None]:
        decision = decide(sub, event, self.types)
        if not decision.delivered or decision.variant is None:
            return decision, None
        return decision, event.encoded(decision.variant, self.columns.get(event.table, []))

    def deliver(self, sub: Subscription, event: Event) -> str:
        """Deliver one event to one subscription without waiting; return the outcome.

        On ``queue_full`` the cursor stays put, so the same event can be delivered again.
        """
        if event.id <= sub.cursor:
            return "duplicate"
        decision, data = self._decide_and_encode(sub, event)
        if data is None:
            sub.cursor = event.id
            return decision.reason
        if not sub.sink.offer(event, decision.ids, data):
            return "queue_full"
        sub.cursor = event.id
        return "delivered"

    async def deliver_wait(self, sub: Subscription, event: Event, timeout: float) -> str:
        """Deliver one event, waiting up to ``timeout`` for room; close the sink if none came."""
        if event.id <= sub.cursor:
            return "duplicate"
        decision, data = self._decide_and_encode(sub, event)
        if data is None:
            sub.cursor = event.id
            return decision.reason
        if not await sub.sink.wait_offer(event, decision.ids, data, timeout):
            sub.sink.close("slow_consumer")
            return "slow_consumer"
        sub.cursor = event.id
        return "delivered"

    def finish_replay(self, sub: Subscription) -> dict[str, int]:
        """After a resume's replay: deliver what arrived meanwhile (without waiting)."""
        outcomes: dict[str, int] = defaultdict(int)
        buffered, sub.buffer = sub.buffer, []
        for event in buffered:
            outcomes[self.deliver(sub, event)] += 1
        sub.buffering = False
        return outcomes

    async def finish_replay_wait(self, sub: Subscription, timeout: float) -> dict[str, int]:
        """After a resume's replay: deliver what arrived meanwhile, waiting for room, then
        go live. Events routed while this waits join the buffer, so order is kept."""
        outcomes: dict[str, int] = defaultdict(int)
        while sub.buffer:
            event = sub.buffer.pop(0)
            outcomes[await self.deliver_wait(sub, event, timeout)] += 1
        sub.buffering = False
        return outcomes

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
        if decision.delivered:
            shared = sorted(principal & (event.new_keys | event.old_keys))
            kind = "a removal (DELETE)" if decision.variant is Variant.REMOVAL else event.type
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
