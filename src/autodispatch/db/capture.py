"""Decoded changes as the event log's capture reads them (``realtime.decoded_events``,
migration 0010).

The capture triggers turn each change of a captured table into an event inside the
writer's transaction; decoding (db/pgoutput.py) reads the same changes from the WAL after
commit. This turns decoded transactions into the JSON that ``realtime.decoded_events``
takes, so the database makes the events with the same functions as capture does:

- only the captured tables (``CAPTURED``), in commit order, each change with its
  transaction's commit time;
- values in their text form; json/jsonb columns are named in ``"j"`` so the database
  reads their text as JSON itself (parsed here, ``12.50`` would come back ``12.5``);
- a TOASTed value an update left as it was (``UNCHANGED``) is taken from the old row,
  which the tables' ``REPLICA IDENTITY FULL`` makes whole; without it the change cannot
  be made into an event, and this says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from autodispatch.db.pgoutput import (
    UNCHANGED,
    Change,
    DecodingError,
    Relation,
    Transaction,
    Value,
    lsn_to_text,
)

CAPTURED = frozenset(
    {"sessions", "session_assignments", "feature_flags", "session_messages", "probe_pings"}
)
_JSON_TYPES = frozenset({114, 3802})  # json, jsonb


def changes_payload(transactions: Iterable[Transaction]) -> list[dict[str, Any]]:
    """The input of ``realtime.decoded_events`` for these transactions, in order."""
    payload: list[dict[str, Any]] = []
    for tx in transactions:
        at, lsn = tx.commit_time.isoformat(), lsn_to_text(tx.final_lsn)
        for item in tx.items:
            if not isinstance(item, Change):
                continue
            relation = item.relation
            if relation.schema != "public" or relation.name not in CAPTURED:
                continue
            if item.kind != "INSERT" and not item.old_whole:
                # Under the default identity a delete brings only the key, the rest null:
                # an event made of that would carry no keys, and nobody would get it.
                raise DecodingError(
                    f"an {item.kind} of public.{relation.name} came without its whole old"
                    " row: the captured tables need REPLICA IDENTITY FULL"
                )
            old = _row(relation, item.old, None) if item.old is not None else None
            new = _row(relation, item.new, item.old) if item.new is not None else None
            change: dict[str, Any] = {
                "t": relation.name,
                "o": item.kind,
                "n": new,
                "p": old,
                "at": at,
                "l": lsn,
            }
            documents = [name for name, type_oid in relation.columns if type_oid in _JSON_TYPES]
            if documents:
                change["j"] = documents
            payload.append(change)
    return payload


def _row(
    relation: Relation, values: dict[str, Value], old: dict[str, Value] | None
) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name, _ in relation.columns:
        value = values[name]
        if value is UNCHANGED:
            value = old.get(name) if old is not None else UNCHANGED
            if value is UNCHANGED:
                raise DecodingError(
                    f"an update of public.{relation.name} kept {name} without sending it,"
                    " and no old row has it: the captured tables need REPLICA IDENTITY FULL"
                )
        row[name] = value
    return row
