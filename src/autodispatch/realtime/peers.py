"""The other processes on the bus, and whether they are still there.

Each process says ``alive`` every ``alive_interval``, and every message it sends carries
that interval. An origin not heard from for ``SILENT_INTERVALS`` of its own intervals is
dropped; a clean stop says ``bye`` and is dropped at once. Dropping an origin is what
takes its presences away everywhere (a process that dies without a word would leave
them behind): ``dropped`` is told, and shared_presence.py sends the leaves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from autodispatch.background import Loops, cancel_tasks, stale_after_for
from autodispatch.realtime.bus import Bus

ALIVE_INTERVAL = 5.0
MAX_ALIVE_INTERVAL = 3600.0  # a peer claiming longer is refused (config.py stops ours)
SILENT_INTERVALS = 3


@dataclass
class Peer:
    """Another origin, as last heard on the bus."""

    last_heard: float
    interval: float  # how often it says alive


class Peers:
    def __init__(
        self,
        bus: Bus,
        *,
        alive_interval: float,
        loops: Loops,
        dropped: Callable[[str, str], None],
        after_alive: Callable[[], Awaitable[None]],
    ) -> None:
        self.bus = bus
        self.alive_interval = alive_interval
        self.peers: dict[str, Peer] = {}
        # The loop reports every run: its errors are counted, /readyz sees it stop.
        self._alive = loops.register(
            "realtime-bus-alive",
            stale_after=stale_after_for(alive_interval),
            event="bus_alive_failed",
        )
        self._dropped = dropped  # (origin, reason): its presences leave
        self._after_alive = after_alive  # run after each alive that reached the bus
        self._stop = asyncio.Event()
        self._beat: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._beat = asyncio.create_task(self._say_alive(), name="realtime-bus-alive")

    async def stop(self) -> None:
        self._stop.set()
        await cancel_tasks(self._beat)

    def heard(self, origin: str, said: Any) -> float:
        """``origin`` sent a message saying it says alive every ``said`` seconds; return
        that interval, checked."""
        interval = float(said)
        if not 0 < interval <= MAX_ALIVE_INTERVAL:
            raise ValueError(f"interval {interval} is out of range")
        now = time.monotonic()
        peer = self.peers.get(origin)
        if peer is None:
            peer = self.peers[origin] = Peer(last_heard=now, interval=interval)
        peer.last_heard, peer.interval = now, interval
        return interval

    def drop(self, origin: str, reason: str) -> None:
        self.peers.pop(origin, None)
        self._dropped(origin, reason)

    def listening_again(self) -> None:
        """The listener (re)connected: we heard nothing meanwhile, which says nothing
        about the others."""
        now = time.monotonic()
        for peer in self.peers.values():
            peer.last_heard = now

    async def _say_alive(self) -> None:
        """Say alive every interval, then ``after_alive`` (our snapshot again if one of
        our changes did not reach the bus); drop origins gone silent. Any error is logged
        and counted, and the loop goes on: silence would get our entries dropped
        everywhere."""
        interval = self.alive_interval
        last = time.monotonic()
        while not self._stop.is_set():
            await asyncio.sleep(interval)
            now = time.monotonic()
            # Woken late, this loop was stalled and so was the listener: what it has not
            # read yet says nothing about the others, so judge them next time.
            stalled = now - last > 2 * interval
            last = now
            failure: Exception | None = None
            try:
                try:
                    await self.bus.publish({"kind": "alive"})
                except self.bus.unavailable as exc:
                    failure = exc  # judge the others all the same
                else:
                    await self._after_alive()
                if self.bus.ready.is_set() and not stalled:
                    for origin, peer in list(self.peers.items()):
                        if now - peer.last_heard > SILENT_INTERVALS * peer.interval:
                            self.drop(origin, "silent")
            except Exception as exc:
                failure = exc
            if failure is None:
                self._alive.ok()
            else:
                self._alive.failed(failure)
