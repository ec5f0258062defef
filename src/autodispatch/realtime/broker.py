"""Broadcast and presence between channels of one topic, in this process and in others.

The broker puts the parts together and routes what the bus brings to the part it is
for; the gateway and the REST broadcast use only this:

- pg_bus.py, the bus between processes (PostgreSQL NOTIFY), behind bus.py's interface;
- fanout.py, the members of each topic here, and broadcasts to them;
- peers.py, the other processes and whether they are still there (``alive``, ``bye``);
- shared_presence.py, presence across processes: own entries, each origin's copy, the
  snapshots that make them converge (presence.py is its part without I/O).

A message of kind ``broadcast`` goes to the fan-out; the kinds ``bye`` and ``alive``,
and the interval every message carries, to the peers; ``presence``, ``snapshot`` and
``sync`` (and ``alive``, which may ask for a missing snapshot) to shared presence.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from autodispatch.background import Loops
from autodispatch.db.database import Database
from autodispatch.realtime.bus import BUS_FORMAT, PayloadTooLarge
from autodispatch.realtime.fanout import Fanout, Member
from autodispatch.realtime.peers import ALIVE_INTERVAL, Peers
from autodispatch.realtime.pg_bus import PgNotifyBus
from autodispatch.realtime.shared_presence import SharedPresence

__all__ = ["Broker", "Member", "PayloadTooLarge"]

log = structlog.get_logger("autodispatch.realtime")

# A process starting waits at most this long for the snapshots of the processes it finds
# listening, so clients reconnecting after a deploy get the whole presence_state.
FIRST_SYNC_SECONDS = 2.0


class Broker:
    def __init__(
        self, db: Database, *, alive_interval: float = ALIVE_INTERVAL, loops: Loops | None = None
    ) -> None:
        self.loops = loops if loops is not None else Loops()
        self.alive_interval = alive_interval
        self.bus = PgNotifyBus(db, alive_interval=alive_interval, loops=self.loops)
        self.origin = self.bus.origin
        self.ready = self.bus.ready  # set while the listener listens
        self.fanout = Fanout(self.bus)
        self.presence = SharedPresence(self.bus, self.fanout)
        self.peers = Peers(
            self.bus,
            alive_interval=alive_interval,
            loops=self.loops,
            dropped=self.presence.drop,
            after_alive=self.presence.repair,
        )
        self._warned: set[tuple[str, str]] = set()

    async def start(self) -> None:
        await self.bus.start(self)
        self.peers.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ready.wait(), timeout=10)
        if self.ready.is_set():
            # Clients reconnecting right after a deploy should find everyone's presence
            # in presence_state, not in a diff a moment later.
            await self.presence.wait_for_snapshots(FIRST_SYNC_SECONDS)

    async def stop(self) -> None:
        """Say bye (the others drop this process's entries at once), then stop listening."""
        await self.peers.stop()
        await self.presence.depart()
        await self.bus.stop()

    def join(self, topic: str, member: Member) -> None:
        self.fanout.join(topic, member)

    def leave(self, topic: str, member: Member) -> None:
        self.fanout.leave(topic, member)

    async def broadcast(self, topic: str, event: str, payload: Any, sender: object) -> None:
        await self.fanout.broadcast(topic, event, payload, sender)

    def presence_state(self, topic: str) -> dict[str, Any]:
        return self.presence.state(topic)

    async def track(self, topic: str, key: str, ref: str, meta: dict[str, Any]) -> None:
        await self.presence.track(topic, key, ref, meta)

    async def untrack(self, topic: str, key: str, ref: str) -> None:
        await self.presence.untrack(topic, key, ref)

    # -- what the bus brings (bus.Receiver) -------------------------------------------
    def received(self, origin: str, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        if kind == "broadcast":  # in any format: its shape has not changed
            self.fanout.received(message)
        if message.get("v") != BUS_FORMAT:
            if kind != "broadcast":
                self._warn_once(origin, f"format {message.get('v')!r}")
            return
        if kind == "bye":
            self.peers.drop(origin, "bye")
            return
        interval = self.peers.heard(origin, message["interval"])
        if kind == "presence":
            self.presence.received_diff(origin, message)
        elif kind == "snapshot":
            self.presence.received_chunk(origin, message)
        elif kind == "sync":
            self.presence.sync_asked(message.get("to"))
        elif kind == "alive":
            self.presence.alive_from(origin, interval)
        elif kind != "broadcast":
            self._warn_once(origin, f"kind {kind!r}")

    def listening_again(self) -> None:
        self.peers.listening_again()
        self.presence.listening_again()

    def _warn_once(self, origin: str, what: str) -> None:
        if (origin, what) not in self._warned and len(self._warned) < 1000:
            self._warned.add((origin, what))
            log.warning("bus_message_ignored", origin=origin, reason=f"unknown {what}")
