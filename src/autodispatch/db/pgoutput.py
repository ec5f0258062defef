"""PostgreSQL's own logical decoding output (``pgoutput``, protocol 1), parsed.

Decoding the captured tables' changes from the WAL is the alternative to the event log's
capture triggers that `bench writes` measures (docs/decisions.md: measured, not taken).
This module turns the plugin's messages into whole transactions, in commit order, each
with its commit LSN and time and its row changes (values in their text form, as the
type's output function writes them) and its transactional messages
(``pg_logical_emit_message``); ``db/slot.py`` reads them from a slot.

Why by hand: the message format is small and fixed (PostgreSQL's documentation, "Logical
Replication Message Formats") and no well-kept library parses it for psycopg 3, which
only lets a replication connection start streaming (``SlotStream``) and leaves the copy
data to us.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # PostgreSQL's timestamps count from here


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
            self._open = Transaction(xid, final_lsn, EPOCH + timedelta(microseconds=micros))
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
