"""Reading a pgoutput slot (db/pgoutput.py) on a real server: whole transactions, in
commit order, with their old rows, messages in place, nothing consumed until advanced."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from autodispatch.db.pgoutput import (
    UNCHANGED,
    Change,
    Decoder,
    DecodingError,
    Message,
    Transaction,
    lsn_from_text,
)
from autodispatch.db.slot import Slot, SlotStream
from conftest import flush_wal

TABLE = """
create table public.decoding_probe (
  id int primary key, body text, tags text[], data jsonb, n int
)"""


@pytest.fixture
def slot(db_url: str) -> Iterator[Slot]:
    """A publication of one scratch table and a slot on it, dropped after the test (a
    database with a slot cannot be dropped)."""
    name = f"probe_{os.getpid()}_{id(db_url) % 100_000}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(TABLE)
        conn.execute("alter table public.decoding_probe replica identity full")
        conn.execute("create publication decoding_probe for table public.decoding_probe")
        made = Slot(name, "decoding_probe")
        made.create(conn)
    try:
        yield made
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            made.drop(conn)  # waits for a stream's server side to let go


def _peek(conn: psycopg.Connection[Any], slot: Slot, limit: int = 100) -> list[Transaction]:
    """Peek once the WAL written so far is flushed (see flush_wal)."""
    flush_wal(conn)
    return slot.peek(conn, limit)


def _changes(tx: Transaction) -> list[tuple[str, Any, Any]]:
    out: list[tuple[str, Any, Any]] = []
    for item in tx.items:
        if isinstance(item, Change):
            out.append((item.kind, item.old, item.new))
        else:
            out.append(("MESSAGE", item.prefix, item.content))
    return out


def test_committed_transactions_come_whole_in_commit_order_with_their_old_rows(
    db_url: str, slot: Slot
) -> None:
    """A transaction begun first but committed last comes last; a rolled-back one never
    comes; each update carries the whole old row (replica identity full); values are in
    their text form (nulls as None); a transactional message comes in its place."""
    first = psycopg.connect(db_url)
    second = psycopg.connect(db_url)
    try:
        first.execute("insert into public.decoding_probe values (1, 'early', '{a}', null, 1)")
        second.execute(
            "insert into public.decoding_probe values"
            """ (2, 'it''s "quoted" — ünïcode', '{x,"y z"}', '{"k": [1, 2]}', null)"""
        )
        second.execute("update public.decoding_probe set n = 7 where id = 2")
        second.commit()
        with psycopg.connect(db_url) as aborted:
            aborted.execute("insert into public.decoding_probe values (3, 'never', null, null, 3)")
            aborted.rollback()
        first.execute("update public.decoding_probe set body = 'late' where id = 1")
        first.commit()
    finally:
        first.close()
        second.close()
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("delete from public.decoding_probe where id = 2")
        with conn.transaction():
            conn.execute("select pg_logical_emit_message(true, 'autodispatch', 'before')")
            conn.execute("insert into public.decoding_probe values (4, null, null, null, 4)")
        conn.execute("select pg_logical_emit_message(false, 'autodispatch', 'not in a tx')")

        txs = _peek(conn, slot, 100)

    two = {"id": "2", "body": 'it\'s "quoted" — ünïcode', "tags": '{x,"y z"}',
           "data": '{"k": [1, 2]}', "n": None}  # fmt: skip
    one = {"id": "1", "body": "early", "tags": "{a}", "data": None, "n": "1"}
    assert [_changes(tx) for tx in txs] == [
        [("INSERT", None, two), ("UPDATE", two, two | {"n": "7"})],
        [("INSERT", None, one), ("UPDATE", one, one | {"body": "late"})],
        [("DELETE", two | {"n": "7"}, None)],
        [
            ("MESSAGE", "autodispatch", b"before"),
            ("INSERT", None, {"id": "4", "body": None, "tags": None, "data": None, "n": "4"}),
        ],
    ]
    assert all(isinstance(i, Change | Message) for tx in txs for i in tx.items)
    lsns = [tx.final_lsn for tx in txs]
    assert lsns == sorted(lsns) and all(tx.end_lsn > tx.final_lsn for tx in txs)
    assert txs[0].items[0].relation.name == "decoding_probe"  # type: ignore[union-attr]


def test_peeking_consumes_nothing_until_the_slot_is_advanced(db_url: str, slot: Slot) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        for i in range(3):
            conn.execute("insert into public.decoding_probe (id) values (%s)", (i,))
        again = [tx.final_lsn for tx in _peek(conn, slot, 100)]
        assert len(again) == 3
        assert [tx.final_lsn for tx in _peek(conn, slot, 100)] == again  # a crash re-reads
        first = _peek(conn, slot, 1)  # whole transactions, at least one
        assert [tx.final_lsn for tx in first] == again[:1]
        slot.advance(conn, first[0].end_lsn)
        assert [tx.final_lsn for tx in _peek(conn, slot, 100)] == again[1:]


def test_an_update_that_leaves_a_toasted_value_says_so(db_url: str, slot: Slot) -> None:
    """Under the default replica identity an update that keeps a TOASTed value sends it
    as UNCHANGED (the WAL does not carry it) and no old row (the key did not change)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("alter table public.decoding_probe replica identity default")
        conn.execute(
            "insert into public.decoding_probe (id, body)"
            " select 1, string_agg(md5(i::text), '') from generate_series(1, 400) i"
        )
        conn.execute("update public.decoding_probe set n = 1 where id = 1")
        txs = _peek(conn, slot, 100)
    update = txs[-1].items[0]
    assert isinstance(update, Change) and update.kind == "UPDATE"
    assert update.old is None and update.new is not None
    assert update.new["body"] is UNCHANGED and update.new["n"] == "1"


def test_a_truncate_of_a_published_table_is_refused(db_url: str, slot: Slot) -> None:
    """Truncate says no rows: a log fed by it could not say which rows left."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("insert into public.decoding_probe (id) values (1)")
        conn.execute("truncate public.decoding_probe")
        with pytest.raises(DecodingError, match="re-sync"):
            _peek(conn, slot, 100)


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([b"Z"], "unknown pgoutput message"),
        ([b"C\x00" + bytes(24)], "outside a transaction"),
        ([b"B\x00\x00"], "ended early"),
        ([b"I" + (42).to_bytes(4, "big") + b"N\x00\x00"], "before its columns"),
    ],
)
def test_the_decoder_refuses_what_it_cannot_read(messages: list[bytes], error: str) -> None:
    decoder = Decoder()
    with pytest.raises(DecodingError, match=error):
        for data in messages:
            decoder.feed(data)


async def _stream_until(stream: SlotStream, count: int) -> list[Transaction]:
    got: list[Transaction] = []
    deadline = asyncio.get_running_loop().time() + 20
    while len(got) < count and asyncio.get_running_loop().time() < deadline:
        got += await stream.read(wait=0.5)
    return got


def _write(db_url: str, *ids: int) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        for i in ids:
            conn.execute("insert into public.decoding_probe (id) values (%s)", (i,))
        flush_wal(conn)  # so the server may send it


def _ids(txs: list[Transaction]) -> list[str]:
    return [str(c.new["id"]) for tx in txs for c in tx.items if isinstance(c, Change) and c.new]


async def test_a_stream_brings_the_transactions_live_and_resumes_after_what_was_confirmed(
    db_url: str, slot: Slot
) -> None:
    """Streamed, the same transactions as peeked, then one written while streaming; after
    a confirm and a new stream, only what was not confirmed comes again."""
    await asyncio.to_thread(_write, db_url, 1, 2, 3)
    with psycopg.connect(db_url, autocommit=True) as conn:
        peeked = [tx.final_lsn for tx in slot.peek(conn, 100)]
    stream = SlotStream(db_url, slot.name, slot.publication)
    await stream.start()
    try:
        first = await _stream_until(stream, 3)
        assert [tx.final_lsn for tx in first] == peeked and _ids(first) == ["1", "2", "3"]
        await asyncio.to_thread(_write, db_url, 4)
        live = await _stream_until(stream, 1)
        assert _ids(live) == ["4"]
        stream.confirm(first[0].end_lsn)
    finally:
        await stream.close()
    confirmed = 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        for _ in range(100):  # the server ends its side of the stream on its own time
            active, lsn = conn.execute(
                "select active, confirmed_flush_lsn from pg_replication_slots where slot_name = %s",
                (slot.name,),
            ).fetchone() or (True, "0/0")
            confirmed = lsn_from_text(str(lsn))
            if not active and confirmed >= first[0].end_lsn:
                break
            await asyncio.sleep(0.05)
    assert confirmed >= first[0].end_lsn
    with psycopg.connect(db_url, autocommit=True) as conn:
        for _ in range(200):  # the first stream's server side lets go on its own time
            if not slot.active(conn):
                break
            await asyncio.sleep(0.05)
    again = SlotStream(db_url, slot.name, slot.publication)
    await again.start()
    try:
        assert _ids(await _stream_until(again, 3)) == ["2", "3", "4"]
    finally:
        await again.close()
