"""Changes of what a user may see, as the gateways act on them.

A subscriber's visibility keys are those of ``auth.principal_keys_for``: the rule RLS
applies. Any change that moves them (a mechanic moved to another workshop, a new account
type, an account disabled or deleted) writes an event on ``auth.principals`` in the same
transaction (migration 0006), so it sits in the log in commit order with every row
event. The hub re-keys that user's subscriptions exactly there: events before it are
decided with the old keys, events after it with the new ones, and in between the
subscriber gets a removal (a DELETE carrying the row as it was) for each row that left
its view. Rows that entered it are not sent, as on a fresh join: the client reads them.

Removals carry no ``event_id`` (SSE: no ``id:``), except the last, which carries the
change's id: a client that disconnects among them resumes from before the change and
gets them all again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autodispatch.realtime.events import Event

PRINCIPAL_SCHEMA = "auth"
PRINCIPAL_TABLE = "principals"
# More removals than this for one change (an admin who is no longer one) and the
# subscriber is told to re-sync instead: reloading is cheaper than that many frames.
MAX_REMOVALS = 1000
NO_CURSOR = 0  # the id of a removal that is not the last of its change


def is_principal_change(event: Event) -> bool:
    return event.table == PRINCIPAL_TABLE and event.schema == PRINCIPAL_SCHEMA


@dataclass(frozen=True, slots=True)
class KeyChange:
    """One user's keys before and after one event of the log."""

    event_id: int
    old: frozenset[str]
    new: frozenset[str]

    @classmethod
    def of(cls, event: Event) -> KeyChange:
        return cls(event.id, _keys(event.old_record), _keys(event.record))

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> KeyChange:
        return cls(int(row["id"]), frozenset(row["old_keys"] or ()), frozenset(row["keys"] or ()))


def _keys(record: Mapping[str, Any] | None) -> frozenset[str]:
    return frozenset((record or {}).get("keys") or ())


def removals(change: Event, rows: Sequence[Mapping[str, Any]]) -> list[Event]:
    """One DELETE event per row that left the view at ``change``: the row as it was, with
    the keys it had (so the router decides it as a removal for the old keys)."""
    found: list[Event] = []
    for i, row in enumerate(rows):
        record = row["record"]
        table = row["table_name"]
        found.append(
            Event(
                id=change.id if i == len(rows) - 1 else NO_CURSOR,
                at=change.at,
                schema="public",
                table=table,
                type="DELETE",
                row_id=str(record.get("key" if table == "feature_flags" else "id")),
                record=None,
                old_record=record,
                new_keys=frozenset(),
                old_keys=frozenset(row["keys"]),
            )
        )
    return found
