"""The sequencer: gives committed events their ids, after their commit (migration 0008).

A transaction that changes a subscribed table inserts its events with no id, and takes
no lock that another writer needs. ``realtime.sequence()`` then numbers the events that
have committed, in insert order, continuing the log without a gap, and sends one NOTIFY
for the readers of every process. This loop runs it:

- at once after this process commits a write (``poke``, which a server wires to
  ``Database.on_write_commit``): pokes that arrive while it runs fold into one more run;
- every ``poll_interval`` seconds, for events written by SQL from elsewhere (an operator,
  another program): they wait at most that long for an id;
- never sooner than ``spacing`` seconds after the previous run started: under load, the
  commits of that interval are numbered by one transaction, not one each (each run is a
  commit with its own WAL flush and NOTIFY); when writes are sparser than that, the next
  poke comes later anyway and is served at once.

Several processes may run it: they take turns on the stream's row lock, which no writer
takes. After a run that numbered events, ``on_sequenced(count, last_id)`` is called (a
server wakes its log reader: its subscribers need not wait for the NOTIFY to come back).
Any process that writes events may run one (the benchmarks' writers do).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import psycopg
import structlog

from autodispatch.background import Loops, stale_after_for
from autodispatch.db import queries

log = structlog.get_logger("autodispatch.db")

BATCH = 10_000  # events numbered per statement at most


class Sequencer:
    def __init__(
        self,
        url: str,
        *,
        poll_interval: float = 0.05,
        spacing: float = 0.0,
        batch: int = BATCH,
        on_sequenced: Callable[[int, int], None] | None = None,
    ) -> None:
        self.url = url
        self.poll_interval = poll_interval
        self.spacing = spacing  # the least time from one run's start to the next's
        self.batch = batch
        self.on_sequenced = on_sequenced
        self.last_id = 0  # the log's last id after the latest run
        self._wake = asyncio.Event()
        self._conn: psycopg.AsyncConnection[tuple[int, int]] | None = None

    def poke(self) -> None:
        """A write that may have made events committed in this process: number them soon."""
        self._wake.set()

    async def run(self, stop: asyncio.Event, loops: Loops | None = None) -> None:
        """Number events until ``stop``; any error is logged and counted (``loops``: the
        ``realtime-sequencer`` loop that ``/readyz`` watches), and the next run comes."""
        loops = loops if loops is not None else Loops()
        health = loops.register(
            "realtime-sequencer",
            stale_after=stale_after_for(self.poll_interval),
            event="event_sequence_failed",
        )
        try:
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                self._wake.clear()  # a poke from here on runs the loop again
                started = loop.time()
                try:
                    await self.sequence_available()
                except Exception as exc:
                    health.failed(exc)
                else:
                    health.ok()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)
                # Under load, pokes come faster than runs end: spacing the runs lets each
                # number the commits of the whole interval in one transaction. When writes
                # are sparse the next poke comes later than this anyway: no delay added.
                rest = started + self.spacing - loop.time()
                if rest > 0 and not stop.is_set():
                    await asyncio.sleep(rest)
        finally:
            await self.close()

    async def sequence_available(self) -> int:
        """Number every committed event that has no id yet; return how many."""
        total = 0
        while True:
            assigned, last_id = await self._sequence_once()
            total += assigned
            self.last_id = last_id
            if assigned and self.on_sequenced is not None:
                self.on_sequenced(assigned, last_id)
            if assigned < self.batch:
                return total

    async def _sequence_once(self) -> tuple[int, int]:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, application_name="autodispatch-sequencer"
                )
            cur = await self._conn.execute(queries.load()["sequence_events"], {"limit": self.batch})
            row = await cur.fetchone()
        except (psycopg.Error, OSError):
            await self.close()
            raise
        assert row is not None
        return int(row[0]), int(row[1])

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._conn.close()
            self._conn = None
