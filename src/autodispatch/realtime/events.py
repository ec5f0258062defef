"""Events read from the log, and what one subscriber receives of each.

The decision of who gets an event uses only the event (the visibility keys the database
stored for the old and the new row) and the subscriber's own keys, so it is the rule
row-level security applies: ``keys(row) && principal_keys``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum
from typing import Any

from autodispatch.realtime.protocol import Filter, encode_json, matches


class Variant(Enum):
    """How an event reaches a subscriber."""

    CHANGE = "change"  # the new row is visible: INSERT or UPDATE as it happened
    CHANGE_WITHOUT_OLD = "change_without_old"  # UPDATE into view: the old row was not theirs
    REMOVAL = "removal"  # the row left their view: a DELETE carrying the old row they saw


@dataclass(slots=True)
class Event:
    id: int
    at: datetime
    schema: str
    table: str
    type: str  # INSERT, UPDATE, DELETE
    row_id: str
    record: dict[str, Any] | None
    old_record: dict[str, Any] | None
    new_keys: frozenset[str]
    old_keys: frozenset[str]
    keys: frozenset[str] = field(init=False, repr=False)  # new_keys | old_keys
    at_ts: float = field(init=False, repr=False)  # ``at`` as a POSIX timestamp
    _encoded: dict[Variant, str] = field(default_factory=dict, repr=False)
    # Each recipient's frame, built once per (wire, topic, binding ids, vsn, data) and
    # shared: most recipients of an event get byte-identical frames (see Channel.offer).
    frames: dict[tuple[object, ...], Any] = field(default_factory=dict, repr=False)
    # False for the frames of an event before its last one to a subscriber (several
    # bindings wanting different variants): they carry the event's id, for de-duplication,
    # and "partial": true, and move no cursor (SSE: no ``id:``), so a client cut off
    # between them resumes from before the event and gets all its frames again.
    final: bool = True
    _partial: Event | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.keys = self.new_keys | self.old_keys
        self.at_ts = self.at.timestamp()

    @property
    def moves_cursor(self) -> bool:
        """Whether a client may resume after this frame's event once it has it."""
        return self.final and self.id != 0  # 0: a removal before the last of a key change

    def partial(self) -> Event:
        """This event as a frame before its last one (``final`` False), made once."""
        twin = self._partial
        if twin is None:
            twin = self._partial = replace(self, final=False, _encoded={}, frames={})
        return twin

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Event:
        return cls(
            id=row["id"],
            at=row["at"],
            schema=row["schema_name"],
            table=row["table_name"],
            type=row["type"],
            row_id=row["row_id"],
            record=row["record"],
            old_record=row["old_record"],
            new_keys=frozenset(row["new_keys"]),
            old_keys=frozenset(row["old_keys"]),
        )

    def variant_for(
        self, principal_keys: frozenset[str], row_filter: Filter | None, types: Mapping[str, str]
    ) -> Variant | None:
        """What a subscriber with these keys and this filter receives, or None."""
        return self.variant_given(
            not self.new_keys.isdisjoint(principal_keys),
            not self.old_keys.isdisjoint(principal_keys),
            row_filter,
            types,
        )

    def variant_given(
        self,
        new_visible: bool,
        old_visible: bool,
        row_filter: Filter | None,
        types: Mapping[str, str],
    ) -> Variant | None:
        """What a subscriber receives, given whether it may see the new and the old row
        (by keys, or by SQL for the baseline), and its filter."""
        new = self.record is not None and new_visible
        old = self.old_record is not None and old_visible
        if row_filter is not None:
            new = new and matches(row_filter, self.record or {}, types)
            old = old and matches(row_filter, self.old_record or {}, types)
        if new:
            if self.type == "UPDATE" and not old:
                return Variant.CHANGE_WITHOUT_OLD
            return Variant.CHANGE
        if old:
            return Variant.REMOVAL
        return None

    def delivered_type(self, variant: Variant) -> str:
        return "DELETE" if variant is Variant.REMOVAL else self.type

    def data(self, variant: Variant, columns: list[dict[str, str]]) -> dict[str, Any]:
        """The ``data`` object of a Supabase ``postgres_changes`` payload, plus our event id."""
        data: dict[str, Any] = {
            "schema": self.schema,
            "table": self.table,
            "commit_timestamp": self.at.isoformat().replace("+00:00", "Z"),
            "type": self.delivered_type(variant),
            "columns": columns,
            "record": {},
            "errors": None,
        }
        if self.id:  # 0: a removal before the last of a key change carries no cursor
            data["event_id"] = self.id
        if not self.final:
            data["partial"] = True
        if variant is Variant.REMOVAL:
            data["old_record"] = self.old_record
        else:
            data["record"] = self.record
            if self.type in ("UPDATE", "DELETE") and variant is Variant.CHANGE:
                data["old_record"] = self.old_record
            elif self.type == "UPDATE":
                data["old_record"] = {}
        return data

    def encoded(self, variant: Variant, columns: list[dict[str, str]]) -> str:
        """The ``data`` JSON, encoded once per variant and shared by every recipient."""
        cached = self._encoded.get(variant)
        if cached is None:
            cached = encode_json(self.data(variant, columns))
            self._encoded[variant] = cached
        return cached
