"""The event log's decoder: the captured tables' committed changes, streamed from a
logical replication slot, written into the log with their ids (migration 0010).

This is the alternative to the capture triggers that `bench writes` measures in its
"decoded" mode, and that the project did not take: the writers go faster with it, but on
a machine they keep busy the log falls behind them (docs/decisions.md, "The decoder
measured by the rate the log keeps up with"). The server does not run it.

Each round reads the transactions that came whole (``SlotStream``), makes their events
in the database (``realtime.apply_decoded``: the ids, and the last applied commit's LSN,
in one transaction), and only then confirms them to the server. A crash between the two
sends them again on the next stream, and ``apply_decoded`` passes over what its LSN says
is in. Only one process can stream a slot at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import psycopg
from psycopg.types.json import Jsonb

from autodispatch.db.capture import changes_payload
from autodispatch.db.slot import Slot, SlotStream

SLOT = "autodispatch_events"
PUBLICATION = "autodispatch_events"


class EventDecoder:
    def __init__(
        self,
        url: str,
        *,
        slot: str = SLOT,
        publication: str = PUBLICATION,
        wait: float = 0.05,
        on_applied: Callable[[int, int], None] | None = None,
    ) -> None:
        self.url = url
        self.slot = slot
        self.publication = publication
        self.wait = wait  # how long a round waits for the first message
        self.on_applied = on_applied
        self.confirm_after_apply = True  # tests turn it off to crash in between
        self._stream: SlotStream | None = None
        self._conn: psycopg.AsyncConnection[tuple[int, int]] | None = None

    def ensure_slot(self) -> None:
        """Create the slot unless it exists: from then on the server keeps the WAL it needs."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            Slot(self.slot, self.publication).create(conn)

    async def apply_available(self) -> int:
        """One round: what came whole, applied and then confirmed; how many events."""
        try:
            return await self._round()
        except BaseException:
            # What this round read may be lost with it: start again from the slot's
            # confirmed position (what came again and is applied already is passed over).
            await self.close()
            raise

    async def _round(self) -> int:
        if self._stream is None:
            stream = SlotStream(self.url, self.slot, self.publication)
            await stream.start()
            self._stream = stream
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, application_name="autodispatch-decoder"
            )
        transactions = await self._stream.read(self.wait)
        if not transactions:
            return 0
        assigned = 0
        payload = changes_payload(transactions)
        if payload:
            cur = await self._conn.execute(
                "select assigned, last_id from realtime.apply_decoded(%s)", (Jsonb(payload),)
            )
            row = await cur.fetchone()
            assert row is not None
            assigned, last_id = int(row[0]), int(row[1])
            if assigned and self.on_applied is not None:
                self.on_applied(assigned, last_id)
        if self.confirm_after_apply:
            self._stream.confirm(transactions[-1].end_lsn)
        return assigned

    async def close(self) -> None:
        stream, conn = self._stream, self._conn
        self._stream = self._conn = None
        with contextlib.suppress(psycopg.Error, OSError):
            if stream is not None:
                await stream.close()
            if conn is not None:
                await conn.close()
