"""The decoder (db/decoder.py) writes each committed change into the log once, in commit
order, gap-free, also when it stops between applying and confirming."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from autodispatch.bench.realtime.workload import create_population
from autodispatch.bench.write_modes import set_log
from autodispatch.bench.writers import live_sessions
from autodispatch.db.capture import CAPTURED
from autodispatch.db.decoder import PUBLICATION, SLOT, EventDecoder
from autodispatch.db.slot import Slot
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
            await asyncio.to_thread(Slot(SLOT, PUBLICATION).drop, conn)


async def _drain(decoder: EventDecoder, url: str, body: str) -> int:
    """Apply rounds until the message ``body`` is in the log (the stream brings
    transactions in commit order: all before it are in too); how many events came."""
    total, deadline = 0, asyncio.get_running_loop().time() + 20
    while asyncio.get_running_loop().time() < deadline:
        total += await decoder.apply_available()
        if any(r[1] == "session_messages" and r[4]["body"] == body for r in _log(url)):
            return total
    raise AssertionError(f"{body!r} was not in the log after 20 s ({total} events came)")


async def _free(url: str) -> None:
    """Wait until no stream holds the slot (a closed one lets go on the server's time)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(200):
            if not Slot(SLOT, PUBLICATION).active(conn):
                return
            await asyncio.sleep(0.05)


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
        assert await _drain(decoder, url, "committed first") > 0
        # Stop between applying and confirming: the next stream sends them again.
        decoder.confirm_after_apply = False
        await asyncio.to_thread(_chat, url, sessions[0], "applied, not confirmed")
        assert await _drain(decoder, url, "applied, not confirmed") == 1
    finally:
        await decoder.close()
    before = _log(url)
    await _free(url)
    again = EventDecoder(url)
    try:
        await asyncio.to_thread(_chat, url, sessions[1], "after the restart")
        # Only the new one: what came again (before it, in commit order) is passed over.
        assert await _drain(again, url, "after the restart") == 1
    finally:
        await again.close()

    log = _log(url)
    assert log[: len(before)] == before
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


async def test_a_round_that_fails_loses_nothing(decoded: str) -> None:
    """A round whose apply fails (here a constraint refuses one event) reads its
    transactions again next time, from the slot's confirmed position; without that, the
    stream would go on past them and they would never be in the log."""
    url = decoded
    members = await create_population(url, 4, lambda _: None)
    customers = [m for m in members if m.kind == "customer"]
    mechanics = [m for m in members if m.mechanic_id is not None]
    session = (await asyncio.to_thread(live_sessions, url, customers, mechanics, 1))[0]
    await asyncio.to_thread(_chat, url, session, "ready")
    decoder = EventDecoder(url)
    try:
        await _drain(decoder, url, "ready")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "alter table realtime.events add constraint refuse_once"
                " check (record ->> 'body' is distinct from 'refused once')"
            )
        await asyncio.to_thread(_chat, url, session, "refused once")
        with pytest.raises(psycopg.errors.CheckViolation):
            for _ in range(400):
                await decoder.apply_available()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("alter table realtime.events drop constraint refuse_once")
        await asyncio.to_thread(_chat, url, session, "after")
        await _free(url)
        await _drain(decoder, url, "after")
    finally:
        await decoder.close()
    bodies = [r[4]["body"] for r in _log(url) if r[1] == "session_messages"]
    assert bodies == ["ready", "refused once", "after"]
