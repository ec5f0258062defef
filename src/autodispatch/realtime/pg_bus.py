"""The bus between processes on PostgreSQL: ``pg_notify('autodispatch_bus', ...)``.

Each message is published with ``pg_notify`` and every process listening on the
channel (itself included, told apart by its origin id) receives it; PostgreSQL delivers
notifications in commit order, which presence relies on. NOTIFY payloads are limited to
8000 bytes: a larger message is refused with a clear error.

The listener has its own autocommit connection, named after its origin so that a
process starting can find the others' listeners in ``pg_stat_activity``. It waits for
notifications with a timeout, checks its connection with a query, and reconnects after
any error. It is the implementation of bus.py's interface that the rest use.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import psycopg
import structlog

from autodispatch.background import Loops, cancel_tasks, stale_after_for
from autodispatch.db.database import Database
from autodispatch.realtime.bus import BUS_FORMAT, PayloadTooLarge, Receiver, encode

log = structlog.get_logger("autodispatch.realtime")

BUS_CHANNEL = "autodispatch_bus"
MAX_BUS_PAYLOAD = 7900
# The listener's application_name: a process starting finds the others' listeners in
# pg_stat_activity, and waits (at most FIRST_SYNC_SECONDS, broker.py) for their snapshots.
LISTENER_NAME = "autodispatch-bus "
# The listener waits this long for notifications, then checks its connection with a query.
LISTEN_SECONDS = 5.0


class PgNotifyBus:
    unavailable: tuple[type[Exception], ...] = (psycopg.Error, OSError)

    def __init__(self, db: Database, *, alive_interval: float, loops: Loops) -> None:
        self.db = db
        self.origin = uuid.uuid4().hex
        self.alive_interval = alive_interval
        self.ready = asyncio.Event()  # set while the listener listens
        # The listener reports every run: its errors are counted, /readyz sees it stop.
        self._listening = loops.register(
            "realtime-bus", stale_after=stale_after_for(LISTEN_SECONDS), event="bus_listen_failed"
        )
        self._stop = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    async def start(self, receiver: Receiver) -> None:
        self._listener = asyncio.create_task(self._listen(receiver), name="realtime-bus")

    async def stop(self) -> None:
        self._stop.set()
        await cancel_tasks(self._listener)

    def _envelope(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"v": BUS_FORMAT, **message, "origin": self.origin, "interval": self.alive_interval}

    def room(self, message: dict[str, Any]) -> int:
        return MAX_BUS_PAYLOAD - len(encode(self._envelope(message)))

    async def publish(self, message: dict[str, Any]) -> None:
        text = encode(self._envelope(message))
        if len(text.encode()) > MAX_BUS_PAYLOAD:
            raise PayloadTooLarge(
                f"this message is {len(text.encode())} bytes; at most {MAX_BUS_PAYLOAD} travel"
                " between servers"
            )
        async with self.db.pool.connection() as conn:
            await conn.execute("select pg_notify(%s, %s)", (BUS_CHANNEL, text))
            await conn.commit()

    async def listening_origins(self) -> set[str]:
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                "select application_name from pg_stat_activity"
                " where datname = current_database() and application_name like %s",
                (LISTENER_NAME + "%",),
            )
            rows = await cur.fetchall()
        origins = {row["application_name"].removeprefix(LISTENER_NAME) for row in rows}
        origins.discard(self.origin)
        return origins

    def _receive(self, receiver: Receiver, text: str) -> None:
        try:
            message = json.loads(text)
            origin = message["origin"]
            if not isinstance(origin, str):
                raise TypeError("origin is not a string")
        except (ValueError, KeyError, TypeError):
            log.warning("bus_message_unreadable")
            return
        if origin == self.origin:
            return  # delivered locally already
        kind = message.get("kind")
        try:
            receiver.received(origin, message)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("bus_message_malformed", origin=origin, kind=kind, error=repr(exc))
        except Exception:  # a bug here must not stop the bus for the whole process
            log.exception("bus_message_failed", origin=origin, kind=kind)

    async def _listen(self, receiver: Receiver) -> None:
        """Listen on the bus until stopped; reconnect after any error (a bug in here must
        not end the listener for good: logged, counted, and it listens again)."""
        while not self._stop.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.db.url,
                    autocommit=True,
                    application_name=LISTENER_NAME + self.origin,
                    # A half-open connection (failover, partition) is noticed in about
                    # 20 s rather than whenever the kernel gives up on it.
                    keepalives=1,
                    keepalives_idle=5,
                    keepalives_interval=5,
                    keepalives_count=3,
                )
                async with conn:
                    await conn.execute(f"listen {BUS_CHANNEL}")
                    receiver.listening_again()
                    self.ready.set()
                    self._listening.ok()
                    while not self._stop.is_set():
                        async for note in conn.notifies(timeout=LISTEN_SECONDS):
                            self._receive(receiver, note.payload)
                        await conn.execute("select 1")
                        self._listening.ok()  # the connection is alive and we are reading it
            except Exception as exc:
                self.ready.clear()
                self._listening.failed(exc)
                await asyncio.sleep(1.0)
        self.ready.clear()
