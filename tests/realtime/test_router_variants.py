"""One frame per (type, row) a subscriber's bindings need (project issue 14, defect 3).

Several bindings of one channel on one table may need different things of one event: a
``status=eq.queued`` list needs a DELETE when a request is accepted, an unfiltered UPDATE
binding needs the UPDATE. realtime-js calls a binding only for frames whose ``data.type``
it wants, so each variant goes out as its own frame, listing exactly the bindings that
want it (``binding_rule``); a full queue never sends a part twice nor skips one.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from binding_rule import alone, received, rule_violations
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from autodispatch.realtime.baseline import PerSubscriberSqlRouter, decide_visible
from autodispatch.realtime.events import Event
from autodispatch.realtime.metrics import RealtimeMetrics
from autodispatch.realtime.protocol import parse_filter
from autodispatch.realtime.router import Binding, Router, Subscription, decide

TABLE = "session_assignments"
TYPES = {TABLE: {"id": "uuid", "status": "text"}, "sessions": {"id": "uuid"}}
COLUMNS = {TABLE: [{"name": "id", "type": "uuid"}, {"name": "status", "type": "text"}]}
KEYS = frozenset({"pool:general", "user:m1"})
ROW_ID = "5b2f0c3e-8f6a-4c1b-9e43-1d2c3b4a5f60"


def event(
    event_id: int = 1,
    type: str = "UPDATE",
    old: str | None = "queued",
    new: str | None = "accepted",
    old_keys: frozenset[str] = KEYS,
    new_keys: frozenset[str] = KEYS,
) -> Event:
    """A change of one assignment's status (``None``: no such row version)."""
    return Event(
        id=event_id,
        at=datetime(2026, 1, 1, tzinfo=UTC),
        schema="public",
        table=TABLE,
        type=type,
        row_id=ROW_ID,
        record=None if new is None else {"id": ROW_ID, "status": new},
        old_record=None if old is None else {"id": ROW_ID, "status": old},
        new_keys=new_keys if new is not None else frozenset(),
        old_keys=old_keys if old is not None else frozenset(),
    )


def binding(i: int, kind: str, row_filter: str | None = None, table: str = TABLE) -> Binding:
    return Binding(
        id=i, table=table, event=kind, filter=parse_filter(row_filter) if row_filter else None
    )


class Recorder:
    """A sink that records each frame; ``room`` frames fit (None: any number)."""

    def __init__(self, room: int | None = None, room_when_waiting: int | None = None) -> None:
        self.frames: list[tuple[int, tuple[int, ...], str]] = []
        self.events: list[Event] = []
        self.room = room
        self.room_when_waiting = room_when_waiting
        self.closed: list[str] = []

    def offer(self, event: Event, ids: tuple[int, ...], data_json: str) -> bool:
        if self.room is not None:
            if self.room == 0:
                return False
            self.room -= 1
        self.frames.append((event.id, ids, data_json))
        self.events.append(event)
        return True

    async def wait_offer(
        self, event: Event, ids: tuple[int, ...], data_json: str, timeout: float
    ) -> bool:
        if self.room_when_waiting is not None:
            self.room = self.room_when_waiting
        return self.offer(event, ids, data_json)

    def close(self, reason: str) -> None:
        self.closed.append(reason)

    def parsed(self) -> list[tuple[tuple[int, ...], dict[str, Any]]]:
        return [(ids, json.loads(data)) for _, ids, data in self.frames]


def subscribe(
    router: Router, bindings: tuple[Binding, ...], sink: Recorder, keys: frozenset[str] = KEYS
) -> Subscription:
    sub = Subscription(keys=keys, bindings=bindings, sink=sink, transport="test")
    router.add(sub)
    return sub


def check_frames(
    bindings: tuple[Binding, ...], sink: Recorder, events: list[Event], keys: frozenset[str] = KEYS
) -> None:
    """The realtime-js rule holds for every frame, and each binding gets what it would get
    alone on its channel (once per event, nothing dropped)."""
    frames = sink.parsed()
    assert rule_violations(bindings, frames, TYPES) == []
    assert received(bindings, frames) == alone(keys, bindings, events, TYPES, COLUMNS)
    for e in events:
        listed = [i for event_id, ids, _ in sink.frames if event_id == e.id for i in ids]
        assert len(listed) == len(set(listed)), "a binding listed twice for one event"


def route_one(bindings: tuple[Binding, ...], e: Event) -> Recorder:
    router, sink = Router(TYPES, COLUMNS), Recorder()
    subscribe(router, bindings, sink)
    router.route(e)
    return sink


def test_filtered_list_then_unfiltered_update_get_a_delete_and_an_update() -> None:
    """Binding 1 ``*`` on status=eq.queued, binding 2 unfiltered UPDATE; queued -> accepted:
    a DELETE for (1,) and an UPDATE for (2,), not one DELETE for (1, 2) that realtime-js
    never hands to binding 2."""
    bindings = (binding(1, "*", "status=eq.queued"), binding(2, "UPDATE"))
    e = event()
    sink = route_one(bindings, e)
    frames = sink.parsed()
    assert [(ids, data["type"]) for ids, data in frames] == [((1,), "DELETE"), ((2,), "UPDATE")]
    assert frames[0][1]["old_record"] == {"id": ROW_ID, "status": "queued"}
    assert frames[1][1]["record"] == {"id": ROW_ID, "status": "accepted"}
    check_frames(bindings, sink, [e])


def test_unfiltered_update_then_filtered_list_get_an_update_and_a_delete() -> None:
    """The other order: binding 1 unfiltered UPDATE, binding 2 ``*`` on status=eq.queued.
    Binding 2's list loses the accepted row (a DELETE), instead of getting an UPDATE that
    keeps it."""
    bindings = (binding(1, "UPDATE"), binding(2, "*", "status=eq.queued"))
    e = event()
    sink = route_one(bindings, e)
    frames = sink.parsed()
    assert [(ids, data["type"]) for ids, data in frames] == [((1,), "UPDATE"), ((2,), "DELETE")]
    check_frames(bindings, sink, [e])


@pytest.mark.parametrize("filtered_first", [False, True])
def test_change_and_change_without_old_go_out_as_two_updates(filtered_first: bool) -> None:
    """Unfiltered ``*`` sees the row before and after (UPDATE with its old row); a
    status=eq.accepted binding sees it come into its view (UPDATE with an empty old row):
    two frames of one type, each with its own ids, in binding order."""
    plain, accepted = binding(1, "*"), binding(2, "UPDATE", "status=eq.accepted")
    bindings = (accepted, plain) if filtered_first else (plain, accepted)
    e = event()
    sink = route_one(bindings, e)
    olds = {ids: data["old_record"] for ids, data in sink.parsed()}
    assert olds == {(1,): {"id": ROW_ID, "status": "queued"}, (2,): {}}
    assert [ids for ids, _ in sink.parsed()] == [(b.id,) for b in bindings]
    check_frames(bindings, sink, [e])


def test_bindings_that_agree_share_one_frame() -> None:
    """Bindings that need the same variant are listed together on one frame; a binding
    that wants neither is on none."""
    bindings = (
        binding(1, "*", "status=eq.queued"),
        binding(2, "UPDATE"),
        binding(3, "*", "status=in.(queued,cancelled)"),
        binding(4, "*"),
        binding(5, "INSERT"),
        binding(6, "UPDATE", "status=neq.cancelled"),
    )
    e = event()
    sink = route_one(bindings, e)
    assert [ids for ids, _ in sink.parsed()] == [(1, 3), (2, 4, 6)]
    check_frames(bindings, sink, [e])


STATUSES = st.sampled_from(["queued", "accepted", "cancelled"])
KEY_SETS = st.sampled_from([KEYS, frozenset({"pool:general"}), frozenset({"user:other"})])
FILTERS = st.sampled_from(
    [
        None,
        "status=eq.queued",
        "status=eq.accepted",
        "status=neq.queued",
        "status=in.(queued,accepted)",
    ]
)
BINDING_SPECS = st.lists(
    st.tuples(
        st.sampled_from(["*", "INSERT", "UPDATE", "DELETE"]),
        FILTERS,
        st.sampled_from([TABLE, TABLE, TABLE, "sessions"]),
    ),
    min_size=1,
    max_size=5,
)


@st.composite
def events(draw: st.DrawFn) -> Event:
    kind = draw(st.sampled_from(["INSERT", "UPDATE", "DELETE"]))
    return event(
        type=kind,
        old=None if kind == "INSERT" else draw(STATUSES),
        new=None if kind == "DELETE" else draw(STATUSES),
        old_keys=draw(KEY_SETS),
        new_keys=draw(KEY_SETS),
    )


@given(specs=BINDING_SPECS, e=events())
def test_every_binding_gets_what_it_would_get_alone(
    specs: list[tuple[str, str | None, str]], e: Event
) -> None:
    """Any bindings, any event: realtime-js hands each binding exactly what it would get
    alone on its channel, and every frame obeys the rule realtime-js matches by."""
    bindings = tuple(binding(i, k, f, t) for i, (k, f, t) in enumerate(specs, start=1))
    check_frames(bindings, route_one(bindings, e), [e])


# --- full queues -------------------------------------------------------------------------

TWO_PARTS = (binding(1, "*", "status=eq.queued"), binding(2, "UPDATE"))


async def test_a_full_queue_after_the_first_part_sends_only_the_rest_when_room_comes() -> None:
    """deliver: part 1 fits, part 2 does not -> queue_full, cursor kept. deliver_wait then
    sends part 2 only, and the cursor moves."""
    router, sink = Router(TYPES, COLUMNS), Recorder(room=1, room_when_waiting=5)
    sub = subscribe(router, TWO_PARTS, sink)
    e = event(event_id=7)
    assert router.deliver(sub, e) == "queue_full"
    assert (sub.cursor, [ids for _, ids, _ in sink.frames]) == (0, [(1,)])
    assert await router.deliver_wait(sub, e, 1.0) == "delivered"
    assert sub.cursor == 7
    assert [ids for _, ids, _ in sink.frames] == [(1,), (2,)]
    check_frames(TWO_PARTS, sink, [e])
    assert router.deliver(sub, e) == "duplicate"


def test_repeated_non_waiting_retries_send_each_part_once() -> None:
    """Offers retried without waiting (room for one, none, one) send each part once."""
    router, sink = Router(TYPES, COLUMNS), Recorder(room=1)
    sub = subscribe(router, TWO_PARTS, sink)
    e = event(event_id=3)
    assert router.deliver(sub, e) == "queue_full"
    assert router.deliver(sub, e) == "queue_full"
    sink.room = 1
    assert router.deliver(sub, e) == "delivered"
    assert sub.cursor == 3
    check_frames(TWO_PARTS, sink, [e])


def test_route_reports_the_blocked_subscription_and_the_reader_finishes_it() -> None:
    """route_collecting lists a subscription whose queue filled mid-event, as the reader
    expects; the next event is not started on the parts counted for this one."""
    router, sink = Router(TYPES, COLUMNS), Recorder(room=1)
    sub = subscribe(router, TWO_PARTS, sink)
    first, second = event(event_id=1), event(event_id=2, old="accepted", new="queued")
    outcomes, blocked = router.route_collecting(first)
    assert (dict(outcomes), blocked) == ({}, [sub])
    # A caller that moves on anyway: the next event starts afresh.
    sink.room = None
    assert router.deliver(sub, second) == "delivered"
    assert [(event_id, ids) for event_id, ids, _ in sink.frames] == [
        (1, (1,)),
        (2, (1,)),
        (2, (2,)),
    ]


async def test_no_room_for_a_later_part_closes_a_slow_consumer_and_keeps_the_cursor() -> None:
    """deliver_wait that gets no room for part 2 closes the sink; the cursor stays put."""
    router, sink = Router(TYPES, COLUMNS), Recorder(room=1, room_when_waiting=0)
    sub = subscribe(router, TWO_PARTS, sink)
    e = event(event_id=4)
    assert router.deliver(sub, e) == "queue_full"
    assert await router.deliver_wait(sub, e, 1.0) == "slow_consumer"
    assert (sub.cursor, sink.closed, len(sink.frames)) == (0, ["slow_consumer"], 1)


# --- the fast path, explain, the SQL baseline ---------------------------------------------


def test_one_unfiltered_binding_decides_without_allocating() -> None:
    """The common subscription (one unfiltered binding per table) gets a prepared decision:
    the same object for every event of a variant."""
    router = Router(TYPES, COLUMNS)
    sub = subscribe(router, (binding(1, "*"),), Recorder())
    first, second = decide(sub, event(1), TYPES), decide(sub, event(2), TYPES)
    assert first.delivered and first is second
    removal = decide(sub, event(3, new_keys=frozenset({"user:other"})), TYPES)
    assert removal.delivered and removal is not first


def test_router_explain_names_the_removal() -> None:
    """Router.explain still says a row that left the view arrives as a DELETE."""
    router = Router(TYPES, COLUMNS)
    said = router.explain(KEYS, event(new_keys=frozenset({"user:other"})))
    assert said.startswith("delivered as a removal (DELETE)")
    assert router.explain(KEYS, event()).startswith("delivered as UPDATE")


def test_sql_baseline_decides_the_same_parts() -> None:
    """The baseline's decision (visibility from SQL) has the key router's parts."""
    router = Router(TYPES, COLUMNS)
    sub = subscribe(router, TWO_PARTS, Recorder())
    e = event()
    assert decide_visible(sub, e, True, True, TYPES) == decide(sub, e, TYPES)


async def test_sql_baseline_sends_each_part_once_through_a_full_queue() -> None:
    """The baseline router offers every part, and finishes a blocked event without
    sending a part twice."""
    router, sink = Router(TYPES, COLUMNS), Recorder(room=1, room_when_waiting=5)
    sub = subscribe(router, TWO_PARTS, sink)
    db: Any = None
    baseline = PerSubscriberSqlRouter(db, router, RealtimeMetrics(CollectorRegistry()), lambda: 1)

    async def visible(e: Event, identities: set[tuple[str, str]]) -> Any:
        return dict.fromkeys(identities, (True, True))

    baseline._visible = visible  # type: ignore[method-assign]
    e = event(event_id=9)
    assert dict(await baseline.route(e)) == {"delivered": 1}
    assert sub.cursor == 9
    check_frames(TWO_PARTS, sink, [e])


def test_only_the_last_frame_of_an_event_moves_the_cursor() -> None:
    """The frames of one event before its last carry its id (for de-duplication) and
    ``partial``, and SSE writes no ``id:`` for them: a client cut off between the parts
    resumes from before the event and gets them all again, not only the first."""
    from autodispatch.realtime.sse import _sse_frame

    router, sink = Router(TYPES, COLUMNS), Recorder()
    subscribe(router, TWO_PARTS, sink)
    router.route(event(event_id=9))
    (_, first_ids, first_json), (_, last_ids, last_json) = sink.frames
    assert (first_ids, last_ids) == ((1,), (2,))
    assert json.loads(first_json)["partial"] is True and json.loads(first_json)["event_id"] == 9
    assert "partial" not in json.loads(last_json) and json.loads(last_json)["event_id"] == 9
    first_event, last_event = sink.events
    assert not _sse_frame(first_event, first_ids, first_json).startswith(b"id:")
    assert _sse_frame(last_event, last_ids, last_json).startswith(b"id: 9\n")
