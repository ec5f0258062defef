"""What the sockets of one process share (the ``Gateway``), and the one timer that
watches them all.

The gateway holds the hub, the broker, the token issuer, the limits, the write batch and
the set of open connections. Its timer runs while any connection is open, once a second
for all of them (no task per connection): it closes sockets that went silent for longer
than ``Limits.heartbeat_timeout`` and expires channels whose token ran out.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from typing import TYPE_CHECKING

from autodispatch.identity.tokens import TokenIssuer
from autodispatch.realtime import protocol as p
from autodispatch.realtime.broker import Broker
from autodispatch.realtime.gateway.access import EXPIRED
from autodispatch.realtime.gateway.limits import Limits
from autodispatch.realtime.gateway.wire import WriteBatch
from autodispatch.realtime.hub import Hub

if TYPE_CHECKING:
    from autodispatch.realtime.gateway.contracts import ConnectionLike

SWEEP_SECONDS = 1.0


class Gateway:
    """State shared by this process's sockets, and the one timer that watches them all."""

    def __init__(self, hub: Hub, broker: Broker, tokens: TokenIssuer, limits: Limits) -> None:
        self.hub = hub
        self.broker = broker
        self.tokens = tokens
        self.limits = limits
        self.connections: set[ConnectionLike] = set()
        self.batch = WriteBatch()
        hub.router.batching.append(self.batch)
        self._sweeper: asyncio.Task[None] | None = None
        # Presence from every process meets in one presence_state, where clients tell
        # entries apart by key and phx_ref: object ids and counters repeat between
        # processes, 48 random bits per gateway practically never do.
        self._id_prefix = secrets.token_urlsafe(6)
        self._ids = itertools.count(1)

    def unique_id(self) -> str:
        """A short string (a default presence key, a phx_ref), unique in practice across
        every gateway, in this process and in others."""
        return f"{self._id_prefix}{next(self._ids):x}"

    def add(self, conn: ConnectionLike) -> None:
        self.connections.add(conn)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep(), name="realtime-sweeper"
            )

    def discard(self, conn: ConnectionLike) -> None:
        self.connections.discard(conn)

    def full(self) -> bool:
        return len(self.connections) >= self.limits.connections

    def announce_shutdown(self) -> None:
        """Tell every channel the server is going away (uvicorn then closes with 1012);
        clients reconnect, to this server or another, and resume from their cursor."""
        for conn in list(self.connections):
            for channel in list(conn.channels.values()):
                conn.send(p.system_error(channel.topic, "system", "ServerShutdown: reconnect"))

    async def _sweep(self) -> None:
        """Once a second: expire channels whose token ran out, close silent sockets."""
        while self.connections:
            await asyncio.sleep(SWEEP_SECONDS)
            now, silent_since = time.time(), time.monotonic() - self.limits.heartbeat_timeout
            for conn in list(self.connections):
                if conn.closing is not None:
                    continue
                if conn.last_seen < silent_since:
                    conn.close("heartbeat_timeout")
                    continue
                for channel in list(conn.channels.values()):
                    if channel.expires_at is not None and now >= channel.expires_at:
                        conn.spawn(conn.expire(channel, EXPIRED))
