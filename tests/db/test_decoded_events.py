"""Events made from decoded changes (migration 0010, db/capture.py) are the events the
capture triggers write for the same writes: same rows, keys and order, and the same
updates left out."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from autodispatch.bench.realtime.workload import LIFECYCLE, create_population
from autodispatch.bench.writers import live_sessions
from autodispatch.db.capture import CAPTURED, changes_payload
from autodispatch.db.pgoutput import DecodingError
from autodispatch.db.slot import Slot
from conftest import flush_wal

# Records as text: compared as Python objects, 12.50 and 12.5 would pass for equal.
FIELDS = "table_name, type, row_id, record::text, old_record::text, new_keys, old_keys"


@pytest.fixture
def decoding(db_url: str) -> Iterator[Slot]:
    """The captured tables published with their whole old rows, and a slot on them."""
    tables = ", ".join(f"public.{t}" for t in sorted(CAPTURED))
    with psycopg.connect(db_url, autocommit=True) as conn:
        for table in CAPTURED:
            conn.execute(f"alter table public.{table} replica identity full")
        conn.execute(f"create publication autodispatch_capture for table {tables}")
        slot = Slot("capture_probe", "autodispatch_capture")
        slot.create(conn)
    try:
        yield slot
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            slot.drop(conn)


def _writes(db_url: str, customers: Any, mechanics: Any) -> None:
    """Inserts, updates and deletes on every captured table, through the statements the
    product runs where there are some: chat, a request's whole lifecycle, flags, pings,
    and an update that changes nothing a subscriber sees."""
    sessions = live_sessions(db_url, customers, mechanics, 2)
    with psycopg.connect(db_url, autocommit=True) as conn:
        for i, s in enumerate(sessions):
            conn.execute(
                "insert into public.session_messages (session_id, sender_id, sender_name,"
                " sender_role, body, visibility_keys) values (%s, %s, 'Dana O''Neil',"
                " 'customer', %s, %s)",
                (s["session"], s["customer"], f'message {i}: "brakes" — ünïcode', s["keys"]),
            )
        conn.execute("delete from public.session_messages where body like 'message 1:%'")
        ids: dict[str, Any] = {
            "customer": customers[0].user_id,
            "workshop": None,
            "mechanic": mechanics[0].mechanic_id,
        }
        for step, sql in LIFECYCLE:
            row = conn.execute(sql, ids).fetchone()
            assert row is not None, step
            ids["session"] = ids.get("session") or row[0]
            if step == "queue":
                ids["assignment"] = row[0]
        conn.execute("update public.session_messages set visibility_keys = visibility_keys")
        conn.execute(  # a document's numbers as written (12.50, not 12.5)
            "update public.session_assignments"
            """ set request_summary = request_summary || '{"quote": 12.50, "n": 1e3}'"""
            " where id = %s",
            (ids["assignment"],),
        )
        conn.execute(
            "insert into public.feature_flags (key, enabled, description)"
            " values ('decoding_probe', false, 'a flag')"
        )
        conn.execute("update public.feature_flags set enabled = true where key = 'decoding_probe'")
        conn.execute("delete from public.feature_flags where key = 'decoding_probe'")
        conn.execute(
            "insert into public.probe_pings (user_id, nonce) values (%s, 'n-1')",
            (customers[0].user_id,),
        )
        flush_wal(conn)


async def test_decoded_changes_make_the_events_the_triggers_made(
    db_url: str, decoding: Slot
) -> None:
    members = await create_population(db_url, 4, lambda _: None)
    customers = [m for m in members if m.kind == "customer"]
    mechanics = [m for m in members if m.mechanic_id is not None]
    _writes(db_url, customers, mechanics)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("select realtime.sequence(100000)")
        captured = conn.execute(
            f"select {FIELDS} from realtime.events where schema_name = 'public' order by id"
        ).fetchall()
        payload = changes_payload(decoding.peek(conn, 100_000))
        decoded = conn.execute(
            f"select {FIELDS} from realtime.decoded_events(%s::jsonb) order by ord",
            (json.dumps(payload),),
        ).fetchall()
    tables = {row[0] for row in captured}
    kinds = {(row[0], row[1]) for row in captured}
    assert tables == CAPTURED and ("session_messages", "DELETE") in kinds  # it covers them
    assert ("feature_flags", "UPDATE") in kinds and len(payload) > len(decoded)  # one left out
    assert decoded == captured


async def test_a_delete_without_the_whole_old_row_is_refused(db_url: str, decoding: Slot) -> None:
    """Under the default identity a delete brings only the key: an event made of it
    would have no keys and reach nobody, so making one is refused with what to do."""
    members = await create_population(db_url, 2, lambda _: None)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("alter table public.probe_pings replica identity default")
        conn.execute(
            "insert into public.probe_pings (user_id, nonce) values (%s, 'n')",
            (members[0].user_id,),
        )
        conn.execute("delete from public.probe_pings")
        flush_wal(conn)
        with pytest.raises(DecodingError, match="REPLICA IDENTITY FULL"):
            changes_payload(decoding.peek(conn, 100))
