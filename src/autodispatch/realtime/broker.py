"""Broadcast and presence between channels of one topic, in this process and in others.

Within a process, a topic's channels are in a dict. Between processes, each message is
published with ``pg_notify('autodispatch_bus', ...)`` and every process (itself
included, told apart by its origin id) hands it to its own channels. NOTIFY payloads
are limited to 8000 bytes: larger broadcasts are refused with a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import defaultdict
from typing import Any, Protocol

import psycopg
import structlog

from autodispatch.db.database import Database

log = structlog.get_logger("autodispatch.realtime")

BUS_CHANNEL = "autodispatch_bus"
MAX_BUS_PAYLOAD = 7900


class Member(Protocol):
    """A joined channel, as the broker sees it."""

    def on_broadcast(self, event: str, payload: Any, sender: object | None) -> None: ...

    def on_presence_diff(self, joins: dict[str, Any], leaves: dict[str, Any]) -> None: ...


class PayloadTooLarge(Exception):
    pass


class Broker:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.origin = uuid.uuid4().hex
        self.members: dict[str, set[Member]] = defaultdict(set)
        # topic -> presence key -> phx_ref -> meta (from every process)
        self.presence: dict[str, dict[str, dict[str, dict[str, Any]]]] = defaultdict(
            lambda: defaultdict(dict)
        )
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="realtime-bus")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ready.wait(), timeout=10)

    async def stop(self) -> None:
        self._stop.set()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def join(self, topic: str, member: Member) -> None:
        self.members[topic].add(member)

    def leave(self, topic: str, member: Member) -> None:
        self.members[topic].discard(member)
        if not self.members[topic]:
            del self.members[topic]

    async def broadcast(self, topic: str, event: str, payload: Any, sender: object) -> None:
        """Deliver to other processes through NOTIFY and to this process's members.

        Published first: a message too large for the bus is refused before anyone gets it.
        """
        await self._publish(
            {"kind": "broadcast", "topic": topic, "event": event, "payload": payload}
        )
        self._deliver_broadcast(topic, event, payload, sender)

    def presence_state(self, topic: str) -> dict[str, Any]:
        return {
            key: {"metas": list(refs.values())}
            for key, refs in self.presence.get(topic, {}).items()
            if refs
        }

    async def track(self, topic: str, key: str, ref: str, meta: dict[str, Any]) -> None:
        await self._presence(topic, {key: {ref: {**meta, "phx_ref": ref}}}, {})

    async def untrack(self, topic: str, key: str, ref: str) -> None:
        entry = self.presence.get(topic, {}).get(key, {}).get(ref)
        if entry is not None:
            await self._presence(topic, {}, {key: {ref: entry}})

    async def _presence(
        self,
        topic: str,
        joins: dict[str, dict[str, dict[str, Any]]],
        leaves: dict[str, dict[str, dict[str, Any]]],
    ) -> None:
        await self._publish({"kind": "presence", "topic": topic, "joins": joins, "leaves": leaves})
        self._apply_presence(topic, joins, leaves)

    def _apply_presence(
        self,
        topic: str,
        joins: dict[str, dict[str, dict[str, Any]]],
        leaves: dict[str, dict[str, dict[str, Any]]],
    ) -> None:
        state = self.presence[topic]
        for key, refs in joins.items():
            state[key].update(refs)
        for key, refs in leaves.items():
            for ref in refs:
                state.get(key, {}).pop(ref, None)
            if key in state and not state[key]:
                del state[key]
        if not state:
            self.presence.pop(topic, None)
        diff_joins = {k: {"metas": list(v.values())} for k, v in joins.items()}
        diff_leaves = {k: {"metas": list(v.values())} for k, v in leaves.items()}
        for member in list(self.members.get(topic, ())):
            member.on_presence_diff(diff_joins, diff_leaves)

    def _deliver_broadcast(
        self, topic: str, event: str, payload: Any, sender: object | None
    ) -> None:
        for member in list(self.members.get(topic, ())):
            member.on_broadcast(event, payload, sender)

    async def _publish(self, message: dict[str, Any]) -> None:
        text = json.dumps({**message, "origin": self.origin}, separators=(",", ":"))
        if len(text.encode()) > MAX_BUS_PAYLOAD:
            raise PayloadTooLarge(
                f"this message is {len(text.encode())} bytes; at most {MAX_BUS_PAYLOAD} travel"
                " between servers"
            )
        async with self.db.pool.connection() as conn:
            await conn.execute("select pg_notify(%s, %s)", (BUS_CHANNEL, text))
            await conn.commit()

    def _receive(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            log.warning("bus_message_unreadable")
            return
        if message.get("origin") == self.origin:
            return  # delivered locally already
        if message.get("kind") == "broadcast":
            self._deliver_broadcast(message["topic"], message["event"], message["payload"], None)
        elif message.get("kind") == "presence":
            self._apply_presence(message["topic"], message["joins"], message["leaves"])

    async def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(self.db.url, autocommit=True)
                async with conn:
                    await conn.execute(f"listen {BUS_CHANNEL}")
                    self.ready.set()
                    while not self._stop.is_set():
                        async for note in conn.notifies(timeout=5.0):
                            self._receive(note.payload)
                        await conn.execute("select 1")
            except (psycopg.Error, OSError) as exc:
                log.warning("bus_listen_failed", error=str(exc))
                await asyncio.sleep(1.0)
