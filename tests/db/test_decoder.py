"""The decoder (db/decoder.py) writes each committed change into the log once, in commit
order, gap-free, also when it stops between applying and confirming."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from autodispatch.db.capture import CAPTURED
from autodispatch.db.decoder import PUBLICATION, SLOT, EventDecoder
from autodispatch.ops.bench_realtime.workload import create_population
from autodispatch.ops.bench_writes import live_sessions, set_log
from conftest import flush_wal


@pytest.fixture
async def decoded(db_url: str) -> AsyncIterator[str]:
    """The log written by decoding only: capture triggers off, the captured tables
    published with their whole old rows, the slot made."""
    set_log(db_url, False)
    tables = ", ".join(f"public.{t}" for t in sorted(CAPTURED))
    with psycopg.connect(db_url, autocommit=True) as conn:
        for table in CAPTURED:
            conn.execute(f"alter table public.{table} replica identity full")
        conn.execute(f"create publication {PUBLICATION} for table {tables}")
    EventDecoder(db_url).ensure_slot()
    try:
        yield db_url
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            for _ in range(100):  # a closed stream's server side ends on its own time
                row = conn.execute(
                    "select active from pg_replication_slots where slot_name = %s", (SLOT,)
                ).fetchone()
                if row is None or not row[0]:
                    break
                await asyncio.sleep(0.05)
            conn.execute(
                "select pg_drop_replication_slot(slot_name) from pg_replication_slots"
                " where slot_name = %s",
                (SLOT,),
            )


async def _drain(decoder: EventDecoder) -> int:
    """Apply rounds until one brings nothing after something came (or 20 s pass)."""
    total, deadline = 0, asyncio.get_running_loop().time() + 20
    while asyncio.get_running_loop().time() < deadline:
        got = await decoder.apply_available()
        total += got
        if total and not got:
            return total
    return total


def _log(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "select id, table_name, type, row_id, record from realtime.events order by id"
        ).fetchall()


def _chat(url: str, session: dict[str, Any], body: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "insert into public.session_messages (session_id, sender_id, sender_name,"
            " sender_role, body, visibility_keys) values (%s, %s, 'Bench Driver', 'customer',"
            " %s, %s)",
            (session["session"], session["customer"], body, session["keys"]),
        )
        flush_wal(conn)


async def test_each_change_once_in_commit_order_also_after_a_stop_before_confirming(
    decoded: str,
) -> None:
    url = decoded
    members = await create_population(url, 4, lambda _: None)
    customers = [m for m in members if m.kind == "customer"]
    mechanics = [m for m in members if m.mechanic_id is not None]
    sessions = await asyncio.to_thread(live_sessions, url, customers, mechanics, 2)
    # Two writers on one row, the first begun earlier and committed later.
    early = psycopg.connect(url)
    try:
        early.execute(
            "update public.sessions set updated_at = now() + interval '1 hour' where id = %s",
            (sessions[0]["session"],),
        )
        await asyncio.to_thread(_chat, url, sessions[1], "committed first")
        early.commit()
    finally:
        early.close()
    with psycopg.connect(url, autocommit=True) as conn:
        flush_wal(conn)

    decoder = EventDecoder(url)
    try:
        assert await _drain(decoder) > 0
        # Stop between applying and confirming: the next stream sends them again.
        decoder.confirm_after_apply = False
        await asyncio.to_thread(_chat, url, sessions[0], "applied, not confirmed")
        assert await _drain(decoder) == 1
    finally:
        await decoder.close()
    before = _log(url)
    again = EventDecoder(url)
    try:
        await asyncio.to_thread(_chat, url, sessions[1], "after the restart")
        assert await _drain(again) == 1  # only the new one: nothing applied twice
    finally:
        await again.close()

    log = _log(url)
    assert log[: len(before)] == before
    assert [row[0] for row in log] == list(range(1, len(log) + 1))  # gap-free from the start
    bodies = [r[4]["body"] for r in log if r[1] == "session_messages"]
    assert bodies == ["committed first", "applied, not confirmed", "after the restart"]
    # The session's last event is its state now (commit order, not begin order).
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "select to_jsonb(s) - 'visibility_keys' from public.sessions s where id = %s",
            (sessions[0]["session"],),
        ).fetchone()
    last = [r for r in log if r[1] == "sessions" and r[3] == str(sessions[0]["session"])][-1]
    assert row is not None and last[4] == row[0]
