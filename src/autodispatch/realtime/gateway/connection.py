"""One socket speaking the Supabase Realtime protocol: a ``Connection``.

It holds what the socket's jobs share: its gateway, vsn, principal (from the apikey), wire
and channels, its rate limits, and whether and why it is closing. It sends server
messages (encoded for its vsn, written through its wire; a wire with no room closes it as
a slow consumer), runs its tasks, and ends: ``close`` when the server closes it, ``lost``
when the client or the network did, then ``finish`` leaves every channel. What it does
with the client's messages lives beside it, one module per job (``inbox``, ``join``,
``access``, ``broadcast_presence``); its methods here are the ones the transports, the
gateway's timer, its channels and those modules call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import structlog

from autodispatch.domain.principal import Principal
from autodispatch.realtime import protocol as p
from autodispatch.realtime.gateway import access, inbox, join
from autodispatch.realtime.gateway.limits import TokenBucket
from autodispatch.realtime.gateway.wire import Wire

if TYPE_CHECKING:
    from autodispatch.realtime.gateway.contracts import ChannelLike
    from autodispatch.realtime.gateway.process import Gateway

log = structlog.get_logger("autodispatch.realtime")


class Connection:
    """One socket speaking the protocol; its frames go through ``wire``."""

    __slots__ = (
        "_next_id",
        "_tasks",
        "channels",
        "closing",
        "gateway",
        "joins",
        "last_seen",
        "messages",
        "pending",
        "principal",
        "vsn",
        "wire",
    )

    def __init__(self, gateway: Gateway, vsn: str, principal: Principal, wire: Wire) -> None:
        self.gateway = gateway
        self.vsn = vsn
        self.principal = principal  # from the socket's apikey
        self.wire = wire
        self.channels: dict[str, ChannelLike] = {}
        self.closing: str | None = None
        self.last_seen = time.monotonic()  # of the last client frame (the timer reads it)
        self.joins = TokenBucket(gateway.limits.joins_per_second)
        self.messages = TokenBucket(gateway.limits.messages_per_second)
        self._next_id = 0
        self.pending: list[p.Message] | None = None  # messages waiting for inbox's worker
        self._tasks: set[asyncio.Task[None]] | None = None

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # -- receiving (inbox.py) ---------------------------------------------------------
    def parse(self, raw: str | bytes) -> p.Message | None:
        """A client frame: answered here when that needs no waiting (heartbeats, refusals);
        otherwise the message for ``handle_message``."""
        return inbox.parse(self, raw)

    def receive(self, raw: str | bytes) -> None:
        """A client frame from a wire that cannot wait (the native server): messages are
        handled in order, by one task while there are any."""
        inbox.receive(self, raw)

    async def handle_message(self, msg: p.Message) -> None:
        await inbox.handle_message(self, msg)

    # -- channels (join.py, access.py) ------------------------------------------------
    async def leave(self, channel: ChannelLike, *, close: bool) -> None:
        await join.leave(self, channel, close=close)

    async def expire(self, channel: ChannelLike, why: str) -> None:
        await access.expire(self, channel, why)

    # -- sending ------------------------------------------------------------------------
    def send(self, msg: p.Message) -> bool:
        """Queue a server message; a full queue closes the connection (it cannot keep up)."""
        try:
            frame = p.encode(msg, self.vsn)
        except p.ProtocolError as exc:
            log.warning("unencodable_message", error=str(exc))
            return False
        if self.closing is not None:
            return False
        if self.wire.write(self.wire.prepare(frame), None):
            return True
        self.close("slow_consumer")
        return False

    def send_error_reply(
        self, ref: str | None, join_ref: str | None, topic: str, code: str, message: str
    ) -> None:
        self.send(p.reply_error(topic, ref, join_ref, f"{code}: {message}"))

    def refuse(self, msg: p.Message, code: str, message: str) -> None:
        """An error reply to ``msg``: ``"Code: message"``."""
        self.send(p.reply_error(msg.topic, msg.ref, msg.join_ref, f"{code}: {message}"))

    # -- its end ------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        """Close the socket saying why (a slow consumer gets nothing more: its cursor is
        the last event it received); the transport then calls ``finish``."""
        if self.closing is None:
            self.closing = reason
            self.wire.close(reason)
            self._detach()

    def lost(self) -> None:
        """The socket is gone (the client closed it, or the network): stop routing to it
        now, clean up in a task."""
        if self.closing is None:
            self.closing = "client_closed"
        self._detach()
        self.spawn(self.finish(self.closing))

    def _detach(self) -> None:
        """No more events or broadcasts for this socket's channels (``finish`` leaves them)."""
        hub, broker = self.gateway.hub, self.gateway.broker
        for channel in self.channels.values():
            broker.leave(channel.topic, channel)
            if channel.subscription is not None:
                hub.unsubscribe(channel.subscription)

    async def finish(self, reason: str) -> None:
        """The socket is gone: leave every channel, count the disconnect."""
        self.gateway.discard(self)
        self.closing = self.closing or reason
        for channel in list(self.channels.values()):
            with contextlib.suppress(Exception):
                await self.leave(channel, close=False)
        self.gateway.hub.metrics.disconnects.labels("websocket", self.closing).inc()
        if self._tasks:
            for task in list(self._tasks):
                if task is not asyncio.current_task():
                    task.cancel()

    async def shutdown(self) -> None:
        for channel in list(self.channels.values()):
            self.send(p.system_error(channel.topic, "system", "ServerShutdown: reconnect"))
        self.close("shutdown")

    # -- its tasks ----------------------------------------------------------------------
    def spawn(self, work: Any) -> None:
        """Run a coroutine for this connection, kept until it is done."""
        if self._tasks is None:
            self._tasks = set()
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._tasks is not None:
            self._tasks.discard(task)
            if not self._tasks:
                self._tasks = None  # an idle connection keeps no set
