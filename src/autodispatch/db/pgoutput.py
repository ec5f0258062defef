"""Reading committed changes from a logical replication slot (``pgoutput``, protocol 1).

The way we chose to take the event log off the writers' commit path is to decode the
captured tables' changes from the WAL instead of capturing them with triggers
(docs/decisions.md, "Where the rest of the gap is"). This module is its first part: it
reads a slot through SQL (``pg_logical_slot_peek_binary_changes``) and turns PostgreSQL's
own output plugin's messages into whole transactions, in commit order, each with its
commit LSN and time and its row changes (values in their text form, as the type's
output function writes them) and its transactional messages
(``pg_logical_emit_message``).

Why by hand: the message format is small and fixed (PostgreSQL's documentation, "Logical
Replication Message Formats") and no well-kept library parses it for psycopg 3, which
only lets a replication connection start streaming (``SlotStream``) and leaves the copy
data to us.

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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import psycopg.sql

PLUGIN = "pgoutput"
_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # PostgreSQL's timestamps count from here


class DecodingError(Exception):
    """The server cannot decode (wrong wal_level, no slot) or sent what we cannot read."""


class _Unchanged:
    """A TOASTed value the update left as it was: the WAL does not carry it."""

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()
Value = str | None | _Unchanged


@dataclass(frozen=True)
class Relation:
    oid: int
    schema: str
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[tuple[str, int], ...]  # (name, type oid), in table order


@dataclass(frozen=True)
class Change:
    """One row change: ``old`` is the whole old row under REPLICA IDENTITY FULL, only its
    key columns otherwise (or None when the key did not change in an update)."""

    kind: str  # INSERT, UPDATE, DELETE
    relation: Relation
    new: dict[str, Value] | None
    old: dict[str, Value] | None
    old_whole: bool = False  # the old row came whole ('O'), not only its key ('K')


@dataclass(frozen=True)
class Message:
    """A transactional ``pg_logical_emit_message``, in its place among the changes."""

    prefix: str
    content: bytes


@dataclass
class Transaction:
    xid: int
    final_lsn: int  # the commit record's LSN
    commit_time: datetime
    items: list[Change | Message] = field(default_factory=list)
    end_lsn: int = 0  # just past the commit record: where the slot may advance to


def lsn_from_text(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def lsn_to_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


_LAYOUTS: dict[str, struct.Struct] = {}  # compiled once
_LENGTH = struct.Struct("!I").unpack_from  # a value's length, read once per column


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, fmt: str) -> Any:
        layout = _LAYOUTS.get(fmt) or _LAYOUTS.setdefault(fmt, struct.Struct(fmt))
        if self.at + layout.size > len(self.data):
            raise DecodingError(f"a pgoutput message ended early ({len(self.data)} bytes)")
        (value,) = layout.unpack_from(self.data, self.at)
        self.at += layout.size
        return value

    def string(self) -> str:
        end = self.data.find(b"\0", self.at)
        if end < 0:
            raise DecodingError("a pgoutput string has no terminator")
        text = self.data[self.at : end].decode()
        self.at = end + 1
        return text

    def raw(self, size: int) -> bytes:
        if size < 0 or self.at + size > len(self.data):
            raise DecodingError(f"a pgoutput value of {size} bytes runs past its message")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk


class Decoder:
    """Turns pgoutput messages, fed in slot order, into whole committed transactions.

    It remembers each relation's columns (a Relation message comes before the first
    change of a table in each decoding session, and again when the table changes)."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}
        self._open: Transaction | None = None

    @property
    def idle(self) -> bool:
        """No transaction is half read."""
        return self._open is None

    def feed(self, data: bytes) -> Transaction | None:
        """One message; the transaction it completes, if it is a Commit."""
        r = _Reader(data)
        kind = chr(r.take("!B"))
        if kind == "B":
            if self._open is not None:
                raise DecodingError("a Begin came inside an open transaction")
            final_lsn, micros, xid = r.take("!Q"), r.take("!q"), r.take("!I")
            self._open = Transaction(xid, final_lsn, _EPOCH + timedelta(microseconds=micros))
            return None
        if kind == "C":
            r.take("!B")  # flags: none defined
            commit_lsn, end_lsn = r.take("!Q"), r.take("!Q")
            done = self._in_transaction("Commit")
            if commit_lsn != done.final_lsn:
                raise DecodingError(
                    f"a Commit at {lsn_to_text(commit_lsn)} closes the transaction begun"
                    f" for {lsn_to_text(done.final_lsn)}"
                )
            done.end_lsn = end_lsn
            self._open = None
            return done
        if kind == "R":
            oid, schema, name = r.take("!I"), r.string(), r.string()
            identity = chr(r.take("!B"))
            columns = []
            for _ in range(r.take("!H")):
                r.take("!B")  # flags: part of the key
                column, type_oid = r.string(), r.take("!I")
                r.take("!i")  # type modifier
                columns.append((column, type_oid))
            self.relations[oid] = Relation(oid, schema, name, identity, tuple(columns))
            return None
        if kind in "IUD":
            relation = self._relation(r.take("!I"))
            change = self._change(kind, relation, r)
            self._in_transaction("a row change").items.append(change)
            return None
        if kind == "M":
            flags = r.take("!B")
            r.take("!Q")  # the message's LSN
            prefix = r.string()
            content = r.raw(r.take("!I"))
            if flags & 1:  # transactional: in its transaction, in order
                self._in_transaction("a message").items.append(Message(prefix, content))
            return None
        if kind in "YO":  # a type's name, a replication origin: nothing we use
            return None
        if kind == "T":
            raise DecodingError(
                "a published table was truncated: the log cannot say which rows went;"
                " every reader must re-sync"
            )
        raise DecodingError(f"unknown pgoutput message {kind!r}")

    def _in_transaction(self, what: str) -> Transaction:
        if self._open is None:
            raise DecodingError(f"{what} came outside a transaction")
        return self._open

    def _relation(self, oid: int) -> Relation:
        try:
            return self.relations[oid]
        except KeyError:
            raise DecodingError(f"a change of relation {oid} came before its columns") from None

    def _change(self, kind: str, relation: Relation, r: _Reader) -> Change:
        marker = chr(r.take("!B"))
        if kind == "I":
            self._expect(marker, "N")
            return Change("INSERT", relation, self._tuple(relation, r), None)
        if kind == "D":
            self._expect(marker, "KO")
            return Change("DELETE", relation, None, self._tuple(relation, r), marker == "O")
        old, whole = None, False
        if marker in "KO":
            old, whole = self._tuple(relation, r), marker == "O"
            marker = chr(r.take("!B"))
        self._expect(marker, "N")
        return Change("UPDATE", relation, self._tuple(relation, r), old, whole)

    @staticmethod
    def _expect(marker: str, allowed: str) -> None:
        if marker not in allowed:
            raise DecodingError(f"a row change has tuple marker {marker!r}, not one of {allowed!r}")

    @staticmethod
    def _tuple(relation: Relation, r: _Reader) -> dict[str, Value]:
        count = r.take("!H")
        if count != len(relation.columns):
            raise DecodingError(
                f"a row of {relation.schema}.{relation.name} has {count} columns;"
                f" its Relation message said {len(relation.columns)}"
            )
        row: dict[str, Value] = {}
        data, at, end = r.data, r.at, len(r.data)
        # The hot loop of decoding (most of the decoder's own time): read in place, one
        # call per value; a row that runs past its message fails its bounds checks here.
        try:
            for name, _ in relation.columns:
                kind = data[at]
                at += 1
                if kind == 0x74:  # 't': Int32 length, then the value's text
                    (size,) = _LENGTH(data, at)
                    at += 4
                    if at + size > end:
                        raise DecodingError(
                            f"a value of {relation.name}.{name} runs past its message"
                        )
                    row[name] = data[at : at + size].decode()
                    at += size
                elif kind == 0x6E:  # 'n'
                    row[name] = None
                elif kind == 0x75:  # 'u'
                    row[name] = UNCHANGED
                else:
                    raise DecodingError(
                        f"column {name} came in format {chr(kind)!r} (we ask for text)"
                    )
        except (IndexError, struct.error):
            raise DecodingError(f"a row of {relation.name} ended early ({end} bytes)") from None
        r.at = at
        return row


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
            if not _PLAIN_NAME.fullmatch(name):
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
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def _pgconn(self) -> Any:
        if self._conn is None:
            raise DecodingError(f"the stream of slot {self.slot} is not started")
        return self._conn.pgconn

    def _feedback(self, pg: Any) -> None:
        """A standby status update: written, flushed and applied up to ``confirmed``."""
        now = int((datetime.now(UTC) - _EPOCH).total_seconds() * 1_000_000)
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
