"""What each realtime binding should receive, computed from row-level security alone.

The reference for ``test_router_matches_rls``: a principal's view is what ``SELECT``
returns under its claims (the policies of migrations 0001-0003), before and after one
move; the frames a binding should get follow from the two views, the rows the move wrote
and the binding's event type and filter, applied the way realtime-js applies them. No
visibility key, no ``Event`` and nothing of the router is used here, so a defect there
cannot hide itself by being repeated on this side.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg

from autodispatch.realtime.events import Event

TABLES = ("sessions", "session_assignments", "feature_flags", "session_messages", "probe_pings")
Row = dict[str, Any]
View = dict[tuple[str, str], Row]  # (table, row id) -> the row as SELECT returns it

# Every subscribed table, as RLS shows it to the caller (the columns a frame carries).
VISIBLE_ROWS = " union all ".join(
    f"select '{table}', {'key' if table == 'feature_flags' else 'id'}::text,"
    f" to_jsonb(t) - 'visibility_keys' from public.{table} t"
    for table in TABLES
)


def row_key_column(table: str) -> str:
    return "key" if table == "feature_flags" else "id"


def visible_rows(conn: psycopg.Connection[Any], user_id: Any | None) -> View:
    """Every row of the subscribed tables that RLS shows this user (None: anonymous)."""
    role = "authenticated" if user_id is not None else "anon"
    claims = {"sub": str(user_id), "role": role} if user_id is not None else {"role": role}
    with conn.transaction():
        conn.execute(
            "select set_config('role', %s, true), set_config('request.jwt.claims', %s, true)",
            (role, json.dumps(claims)),
        )
        rows = conn.execute(VISIBLE_ROWS).fetchall()
    return {(table, row_id): record for table, row_id, record in rows}


@dataclass(frozen=True)
class Spec:
    """A ``postgres_changes`` binding, with its filter also written out as Python (``holds``)
    so that the expectation does not reuse the router's filter code."""

    table: str
    event: str  # '*', 'INSERT', 'UPDATE', 'DELETE'
    filter: str | None
    holds: Callable[[Row], bool]

    def wants(self, kind: str) -> bool:
        return self.event in ("*", kind)

    def __str__(self) -> str:
        return f"{self.event} {self.table}" + (f" [{self.filter}]" if self.filter else "")


def _always(row: Row) -> bool:
    return True


# Subscriptions draw their bindings from here: every table, every event type, and on the
# busy tables filters whose answer changes as a row moves through its lifecycle.
POOL = (
    Spec("session_assignments", "*", "status=eq.queued", lambda r: r["status"] == "queued"),
    Spec(
        "session_assignments",
        "DELETE",
        "status=in.(queued,offered)",
        lambda r: r["status"] in ("queued", "offered"),
    ),
    Spec("session_assignments", "UPDATE", None, _always),
    Spec("session_assignments", "INSERT", None, _always),
    Spec(
        "session_assignments",
        "*",
        "status=neq.pending_waiver",
        lambda r: r["status"] != "pending_waiver",
    ),
    Spec("sessions", "*", None, _always),
    Spec(
        "sessions",
        "UPDATE",
        "status=in.(waiting,live)",
        lambda r: r["status"] in ("waiting", "live"),
    ),
    Spec("session_messages", "*", None, _always),
    Spec(
        "session_messages",
        "INSERT",
        "sender_role=eq.customer",
        lambda r: r["sender_role"] == "customer",
    ),
    Spec("probe_pings", "INSERT", None, _always),
    Spec("probe_pings", "*", "nonce=lt.m", lambda r: r["nonce"] < "m"),
    Spec("probe_pings", "DELETE", None, _always),
    Spec("feature_flags", "*", "enabled=eq.true", lambda r: r["enabled"] is True),
    Spec("feature_flags", "UPDATE", None, _always),
)


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


class Seen(NamedTuple):
    """One frame as one binding sees it. ``old_record`` is None when the frame has none."""

    event_id: int | None
    table: str
    type: str
    row_id: str
    record: str  # canonical JSON
    old_record: str | None

    def __repr__(self) -> str:
        return f"<{self.type} {self.table} {self.row_id[:8]} event {self.event_id}>"


def seen(data: Mapping[str, Any]) -> Seen:
    """A received ``postgres_changes`` ``data`` object."""
    row = data["record"] or data.get("old_record") or {}
    return Seen(
        data.get("event_id"),
        data["table"],
        data["type"],
        str(row.get(row_key_column(data["table"]))),
        _canon(data["record"]),
        _canon(data["old_record"]) if "old_record" in data else None,
    )


class LogRow(NamedTuple):
    """An event of the log as written (only what the expectation needs)."""

    id: int
    schema: str
    table: str
    type: str
    row_id: str


def expected_row_frames(
    bindings: Sequence[tuple[int, Spec]], events: Iterable[LogRow], before: View, after: View
) -> dict[int, list[Seen]]:
    """What each binding gets of one move's row events (one per row): the new version
    when RLS shows it after the move and the filter holds for it (an UPDATE whose old
    version the binding could not see carries an empty old record); else a DELETE with
    the old version when RLS showed it before the move and the filter held for it; then
    only if the binding wants that type."""
    out: dict[int, list[Seen]] = {i: [] for i, _ in bindings}
    for e in events:
        now = after.get((e.table, e.row_id)) if e.type != "DELETE" else None
        was = before.get((e.table, e.row_id)) if e.type != "INSERT" else None
        for i, spec in bindings:
            if spec.table != e.table:
                continue
            new = now is not None and spec.holds(now)
            old = was is not None and spec.holds(was)
            if new:
                assert now is not None
                kind = e.type
                old_record = None if kind == "INSERT" else _canon(was if old else {})
                frame = Seen(e.id, e.table, kind, e.row_id, _canon(now), old_record)
            elif old:
                kind = "DELETE"
                frame = Seen(e.id, e.table, kind, e.row_id, _canon({}), _canon(was))
            else:
                continue
            if spec.wants(kind):
                out[i].append(frame)
    return out


def expected_removals(
    bindings: Sequence[tuple[int, Spec]], before: View, after: View
) -> dict[int, list[Seen]]:
    """What each binding gets when its principal's keys change: a DELETE carrying the
    row as it was, for every row RLS showed before and hides after, where the filter
    held for that row and the binding wants DELETE (sorted; ``event_id`` left out)."""
    gone = [key for key in before if key not in after]
    out: dict[int, list[Seen]] = {}
    for i, spec in bindings:
        out[i] = sorted(
            Seen(None, table, "DELETE", row_id, _canon({}), _canon(before[(table, row_id)]))
            for table, row_id in gone
            if table == spec.table and spec.holds(before[(table, row_id)]) and spec.wants("DELETE")
        )
    return out


@dataclass
class Phase:
    """One transaction of a move: the events it wrote (ids ``after < id <= last``), and
    every principal's view before and after it."""

    move: str
    after_id: int
    last: int
    rows: list[LogRow]  # events on the subscribed tables, one per row
    changed: str | None  # the user whose keys this transaction changed, if any
    change_id: int | None
    before: dict[str, View]
    views: dict[str, View]


def split_by_phase(
    frames: Sequence[tuple[tuple[int, ...], dict[str, Any]]],
    phases: Sequence[Phase],
    name: str,
    user_id: str | None,
) -> list[list[tuple[tuple[int, ...], dict[str, Any]]]]:
    """One subscription's frames, in the order received, grouped by the phase whose event
    they carry (a frame of an earlier phase after one of a later phase stays with the
    later one, where it can match nothing). A frame without an event id is a removal of a
    change of this user's keys, not the last of that change: it belongs to one of this
    user's changes from the current phase up to that of the next frame with an id, and of
    those to the first whose view lost the row it carries (two changes in a row lose
    different rows: a row gone in one is not in the view the next one starts from)."""
    out: list[list[tuple[tuple[int, ...], dict[str, Any]]]] = [[] for _ in phases]

    def phase_of(event_id: int) -> int:
        found = [i for i, p in enumerate(phases) if p.after_id < event_id <= p.last]
        assert found, f"a frame of event {event_id}, which no move wrote"
        return found[0]

    current = 0
    for n, (ids, data) in enumerate(frames):
        event_id = data.get("event_id")
        if event_id is not None:
            current = max(current, phase_of(event_id))
        else:
            later = [phase_of(d["event_id"]) for _, d in frames[n + 1 :] if d.get("event_id")]
            until = later[0] if later else len(phases) - 1
            row = seen(data)
            changes = [
                i
                for i in range(current, until + 1)
                if user_id is not None and phases[i].changed == user_id
            ]
            lost = [
                i
                for i in changes
                if (row.table, row.row_id) in phases[i].before[name]
                and (row.table, row.row_id) not in phases[i].views[name]
            ]
            current = (lost or changes or [current])[0]
        out[current].append((ids, data))
    return out


class RecordingSink:
    """A subscription's sink that takes every frame at once and keeps it as sent."""

    def __init__(self) -> None:
        self.frames: list[tuple[tuple[int, ...], dict[str, Any]]] = []
        self.closed: list[str] = []

    def offer(self, event: Event, ids: tuple[int, ...], data_json: str) -> bool:
        self.frames.append((ids, json.loads(data_json)))
        return True

    async def wait_offer(
        self, event: Event, ids: tuple[int, ...], data_json: str, timeout: float
    ) -> bool:
        return self.offer(event, ids, data_json)

    def close(self, reason: str) -> None:
        self.closed.append(reason)

    def take(self) -> list[tuple[tuple[int, ...], dict[str, Any]]]:
        frames, self.frames = self.frames, []
        return frames


def received(
    binding_ids: Iterable[int], frames: Iterable[tuple[tuple[int, ...], Mapping[str, Any]]]
) -> dict[int, list[Seen]]:
    """Per binding, every frame that lists it, in order. realtime-js would not call a
    binding for a frame of a type it does not want: listing it there is a defect too, so
    such frames are kept here, where they cannot match any expectation."""
    out: dict[int, list[Seen]] = {i: [] for i in binding_ids}
    for ids, data in frames:
        for i in ids:
            out.setdefault(i, []).append(seen(data))
    return out
