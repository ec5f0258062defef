"""A pgoutput slot: made, read through SQL, advanced and dropped (``Slot``), or streamed
(``SlotStream``), its messages parsed by ``db/pgoutput.py``.

Peeking does not consume: the caller applies a batch, records the last applied commit's
LSN in the same transaction as what it wrote, and only then advances the slot
(``advance``). After a crash it peeks again and skips what its record says it applied.

Each SQL call decodes again from the slot's ``restart_lsn``, which moves only at a
running-transactions record (every 15 s under load): measured, a call grew from 5 ms to
over 90 ms as that distance grew to 20 MB. So ``Slot`` is for tests and occasional reads;
a reader that keeps up with writers streams the same messages (``Decoder`` parses both).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import struct
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import psycopg.sql

from autodispatch.db.pgoutput import (
    EPOCH,
    Decoder,
    DecodingError,
    Transaction,
    lsn_to_text,
)

PLUGIN = "pgoutput"
PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # slot and publication names


def require_logical(conn: psycopg.Connection[Any]) -> None:
    """Fail with what to do when the server cannot decode."""
    row = conn.execute("show wal_level").fetchone()
    if row is None or row[0] != "logical":
        level = row[0] if row else "unknown"
        raise DecodingError(
            f"wal_level is {level}; decoding needs wal_level = logical"
            " (ALTER SYSTEM SET wal_level = logical, then restart the server)"
        )


class Slot:
    """A pgoutput slot of one database, read through SQL."""

    def __init__(self, name: str, publication: str) -> None:
        self.name = name
        self.publication = publication
        self.decoder = Decoder()

    def create(self, conn: psycopg.Connection[Any]) -> None:
        """Create the slot unless it exists (it keeps WAL from now on until advanced)."""
        require_logical(conn)
        found = conn.execute(
            "select database = current_database() and plugin = %s from pg_replication_slots"
            " where slot_name = %s",
            (PLUGIN, self.name),
        ).fetchone()
        if found is None:
            conn.execute("select pg_create_logical_replication_slot(%s, %s)", (self.name, PLUGIN))
        elif not found[0]:
            raise DecodingError(
                f"replication slot {self.name} belongs to another database or plugin"
                " (slot names are the server's, not a database's): choose another name"
            )

    def drop(self, conn: psycopg.Connection[Any], wait: float = 10.0) -> None:
        """Drop the slot once no stream holds it (a closed stream's server side ends on
        its own time), waiting up to ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and self.active(conn):
            time.sleep(0.05)
        conn.execute(
            "select pg_drop_replication_slot(slot_name) from pg_replication_slots"
            " where slot_name = %s",
            (self.name,),
        )

    def active(self, conn: psycopg.Connection[Any]) -> bool:
        """Whether a stream holds the slot now."""
        row = conn.execute(
            "select active from pg_replication_slots where slot_name = %s", (self.name,)
        ).fetchone()
        return bool(row and row[0])

    def peek(self, conn: psycopg.Connection[Any], limit: int) -> list[Transaction]:
        """The next committed transactions (whole ones: the server stops at a transaction's
        end once ``limit`` changes are out), without consuming them.

        Each peek decodes from the slot's confirmed position, so the decoder starts fresh
        (the server sends every relation's columns again)."""
        self.decoder = Decoder()
        rows = conn.execute(
            "select data from pg_logical_slot_peek_binary_changes(%s, null, %s,"
            " 'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
            (self.name, limit, self.publication),
        ).fetchall()
        done = []
        for (data,) in rows:
            finished = self.decoder.feed(bytes(data))
            if finished is not None:
                done.append(finished)
        return done

    def advance(self, conn: psycopg.Connection[Any], lsn: int) -> None:
        """Everything up to ``lsn`` is applied: the server may drop that WAL."""
        conn.execute(
            "select pg_replication_slot_advance(%s, %s::pg_lsn)", (self.name, lsn_to_text(lsn))
        )


class SlotStream:
    """A slot's messages streamed by the server as they are decoded (``START_REPLICATION``
    on a replication connection): no decoding again from ``restart_lsn`` per read.

    ``read`` returns the transactions that have come whole; ``confirm`` tells the server
    that everything up to an LSN is applied (it may drop that WAL; a new stream starts
    after it). Until confirmed, a transaction comes again on the next stream: the caller
    applies each once by the commit LSN it recorded (``Transaction.final_lsn``).
    The connection's role needs the REPLICATION attribute (or to be a superuser)."""

    def __init__(self, url: str, slot: str, publication: str) -> None:
        for name in (slot, publication):
            if not PLAIN_NAME.fullmatch(name):
                raise DecodingError(
                    f"{name!r}: slot and publication names here are lower-case letters,"
                    " digits and underscores (the replication command takes them as is)"
                )
        self.url = url
        self.slot = slot
        self.publication = publication
        self.decoder = Decoder()
        self.confirmed = 0  # reported to the server as written, flushed and applied
        self._handed = 0  # the end of the last transaction ``read`` returned
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def start(self) -> None:
        """Connect and start streaming after the slot's confirmed position."""
        self.decoder = Decoder()  # the server sends each relation's columns again
        # Values in the forms the database reads back exactly (as PostgreSQL's own apply
        # workers ask); a name of its own, so it is never taken for a synchronous standby.
        self._conn = await psycopg.AsyncConnection.connect(
            self.url,
            autocommit=True,
            replication="database",
            application_name="autodispatch-decoding",
            options="-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3",
        )
        await self._conn.execute(
            f"START_REPLICATION SLOT {self.slot} LOGICAL 0/0"  # 0/0: the slot's position
            f" (proto_version '1', publication_names '{self.publication}', messages 'true')"
        )

    async def read(self, wait: float) -> list[Transaction]:
        """Every transaction that has come whole; waits up to ``wait`` seconds for the
        first message when none is there."""
        pg = self._pgconn()
        done: list[Transaction] = []
        waited = False
        while True:
            size, data = pg.get_copy_data(1)
            if size == 0:  # nothing buffered: what came is all there is, or wait once
                if done or waited:
                    return done
                await self._readable(pg.socket, wait)
                pg.consume_input()
                waited = True
                continue
            if size < 0:
                error = pg.error_message.decode(errors="replace").strip()
                raise DecodingError(
                    f"the replication stream of slot {self.slot} ended: {error or 'no error'}"
                )
            message = bytes(data)
            if message[:1] == b"w":  # XLogData: start LSN, end LSN, send time, then ours
                finished = self.decoder.feed(message[25:])
                if finished is not None:
                    done.append(finished)
                    self._handed = finished.end_lsn
            elif message[:1] == b"k":  # keepalive: how far the server has sent
                (sent,) = struct.unpack_from("!Q", message, 1)
                # Transactions that touch no published table come as nothing at all: with
                # none of ours open or unconfirmed, all before ``sent`` is done, and saying
                # so lets the server drop that WAL (else the slot would keep it all).
                if self.decoder.idle and self._handed <= self.confirmed:
                    self.confirmed = max(self.confirmed, sent)
                if message[17:18] == b"\x01" or self.confirmed == sent:
                    self._feedback(pg)

    def confirm(self, lsn: int) -> None:
        """Everything up to ``lsn`` is applied."""
        self.confirmed = max(self.confirmed, lsn)
        self._feedback(self._pgconn())

    async def close(self) -> None:
        """End the stream the way the protocol does (CopyDone, then the server's end of
        the copy), so the server has read the last status update before the connection
        goes: closed at once, a walsender busy sending could drop it, and the next stream
        would bring again what was confirmed (harmless to the decoder, which passes over
        what it applied, but not what ``confirm`` says)."""
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        with contextlib.suppress(psycopg.Error, OSError, DecodingError):
            await self._end_copy(conn.pgconn, deadline=time.monotonic() + 2.0)
        await conn.close()

    async def _end_copy(self, pg: Any, *, deadline: float) -> None:
        if pg.put_copy_end(None) != 1:
            return
        while pg.flush() == 1:
            await self._readable(pg.socket, 0.05)
        while time.monotonic() < deadline:  # the server's rest of the copy, then its end
            size, _ = pg.get_copy_data(1)
            if size == -1:  # the copy is over: the server has read all we sent
                while time.monotonic() < deadline:  # its results, without blocking
                    pg.consume_input()
                    if not pg.is_busy():
                        if pg.get_result() is None:
                            return
                        continue
                    await self._readable(pg.socket, deadline - time.monotonic())
                return
            if size == 0:
                await self._readable(pg.socket, deadline - time.monotonic())
                pg.consume_input()
            if size == -2:
                return

    def _pgconn(self) -> Any:
        if self._conn is None:
            raise DecodingError(f"the stream of slot {self.slot} is not started")
        return self._conn.pgconn

    def _feedback(self, pg: Any) -> None:
        """A standby status update: written, flushed and applied up to ``confirmed``."""
        now = int((datetime.now(UTC) - EPOCH).total_seconds() * 1_000_000)
        lsn = self.confirmed
        if pg.put_copy_data(b"r" + struct.pack("!QQQqB", lsn, lsn, lsn, now, 0)) != 1:
            raise DecodingError(f"a status update for slot {self.slot} could not be queued")
        while pg.flush() == 1:  # a few dozen bytes: the socket takes them at once, or soon
            select.select([], [pg.socket], [], 1.0)

    @staticmethod
    async def _readable(fd: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ready, timeout)
        finally:
            loop.remove_reader(fd)
