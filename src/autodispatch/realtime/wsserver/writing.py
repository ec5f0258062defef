"""Frames written to a native realtime socket: its ``Wire``, and its closing handshake.

A row event costs each recipient one ``transport.write`` of frame bytes built once for
everyone on the same topic, binding ids and vsn: server frames are unmasked
(``frame_bytes``), so they are the same bytes for every recipient. While the reader
routes a batch of events (``gateway.WriteBatch``), each connection's frames are gathered
and written with one call.

Backpressure: the transport buffers what the kernel does not take yet; past its high
water mark frames wait in a backlog of at most ``Limits.queue_size`` frames. A write
that finds the backlog full fails, the reader then waits (up to
``slow_consumer_seconds``) for room, and a client that still has not read is closed
with 4000 ``slow_consumer``; it resumes from its cursor and loses nothing.

Closing: the close frame goes out after the frames already waiting, except to a slow
consumer, which gets nothing more (its cursor stays exact); a client that has not closed
the TCP connection ``CLOSE_TIMEOUT`` seconds later is cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import ClassVar

from websockets.exceptions import InvalidState
from websockets.server import ServerProtocol

from autodispatch.realtime.events import Event
from autodispatch.realtime.gateway import CLOSE_CODES, CONTROL_ROOM, Gateway
from autodispatch.realtime.metrics import SentFrames

CLOSE_TIMEOUT = 10.0  # after our close frame, how long the client has to answer
_FIN_TEXT = 0x81
_FIN_BINARY = 0x82


def frame_bytes(payload: bytes, first: int = _FIN_TEXT) -> bytes:
    """A whole, unmasked server frame (RFC 6455 section 5.2) carrying ``payload``."""
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return bytes((first, 126)) + size.to_bytes(2, "big") + payload
    return bytes((first, 127)) + size.to_bytes(8, "big") + payload


class SocketWire:
    """The ``Wire`` of a native realtime socket: its frames, written to its transport.
    ``RealtimeWebSocket`` is one (it sets ``transport``, ``ws`` and ``sent``)."""

    gateway: ClassVar[Gateway]
    kind = "native"

    __slots__ = (
        "_backlog",
        "_close_timer",
        "_gathered",
        "_room",
        "closing",
        "paused",
        "sent",
        "transport",
        "ws",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.ws: ServerProtocol | None = None  # writes the close frame and control frames
        self.closing = False
        self.paused = False
        self.sent: SentFrames | None = None
        self._backlog: deque[tuple[bytes, Event | None]] | None = None
        self._gathered: list[tuple[bytes, Event | None]] | None = None  # see WriteBatch
        self._room: asyncio.Future[None] | None = None
        self._close_timer: asyncio.TimerHandle | None = None

    # -- the Wire a Connection writes to ----------------------------------------------------
    def prepare(self, frame: str | bytes) -> bytes:
        if isinstance(frame, str):
            return frame_bytes(frame.encode())
        return frame_bytes(frame, _FIN_BINARY)

    def write(self, frame: bytes, event: Event | None) -> bool:
        if self.closing:
            return False
        limit = self.gateway.limits.queue_size + (CONTROL_ROOM if event is None else 0)
        backlog = self._backlog
        if backlog is None and not self.paused:
            batch = self.gateway.batch
            if batch.active:
                gathered = self._gathered
                if gathered is None:
                    self._gathered = [(frame, event)]
                    batch.gathering.append(self)
                elif len(gathered) >= limit:
                    return False
                else:
                    gathered.append((frame, event))
                return True
            assert self.transport is not None
            self.transport.write(frame)
            if event is not None and self.sent is not None:
                self.sent.sent(time.time() - event.at_ts)
            return True
        if backlog is None:
            backlog = self._backlog = deque()
        elif len(backlog) >= limit:
            return False
        backlog.append((frame, event))
        return True

    def write_gathered(self) -> None:
        """The batch is over: write the frames gathered meanwhile, with one call."""
        gathered, self._gathered = self._gathered, None
        if not gathered or self.closing or self.transport is None:
            return
        if self.paused or self._backlog is not None:  # full since: behind the backlog
            if self._backlog is None:
                self._backlog = deque()
            self._backlog.extend(gathered)
            return
        self.transport.write(b"".join([frame for frame, _ in gathered]))
        sent = self.sent
        if sent is not None:
            now = time.time()
            for _, event in gathered:
                if event is not None:
                    sent.sent(now - event.at_ts)

    async def write_wait(self, frame: bytes, event: Event | None, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.write(frame, event):
            left = deadline - time.monotonic()
            if self.closing or left <= 0:
                return False
            if self._room is None:
                self._room = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._room), left)
        return True

    def close(self, reason: str) -> None:
        """Close with the reason's code: after the frames already waiting, except for a
        slow consumer, which gets nothing more (its cursor stays exact)."""
        if self.closing or self.ws is None:
            return
        if reason == "slow_consumer":
            self._backlog = self._gathered = None
        elif self._gathered:
            self.write_gathered()  # what was gathered goes before the close frame
        self.closing = True
        with contextlib.suppress(InvalidState):
            self.ws.send_close(CLOSE_CODES.get(reason, 1000), reason)
        close_frame = b"".join(self.ws.data_to_send())
        if self._backlog:
            self._backlog.append((close_frame, None))
        elif self.transport is not None:
            self.transport.write(close_frame)
        self._wake(None)
        self._close_later()

    # -- what the socket's protocol calls -------------------------------------------------
    def _drain(self) -> None:
        """The transport took what it had: write waiting frames until it is full again."""
        backlog = self._backlog
        transport = self.transport
        if backlog is None or transport is None:
            return
        sent = self.sent
        while backlog and not self.paused:
            frame, event = backlog.popleft()
            transport.write(frame)
            if event is not None and sent is not None:
                sent.sent(time.time() - event.at_ts)
        if not backlog:
            self._backlog = None
        self._wake(None)

    def _flush_protocol(self) -> None:
        """Write what ServerProtocol has to send (handshake responses, pongs, close
        frames); an empty chunk means: close the TCP connection."""
        assert self.ws is not None and self.transport is not None
        for chunk in self.ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
            else:
                self.transport.close()

    def _drop_backlog(self) -> None:
        """Frames still waiting for the client are dropped (it resumes from its cursor)."""
        self._backlog = None

    def _stop_writing(self) -> None:
        """The client closed (or broke the protocol): nothing more to send."""
        self.closing = True
        self._backlog = None

    def _transport_lost(self) -> None:
        """The TCP connection is gone: nothing waits, and a write waiting for room ends."""
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._backlog = None
        self._wake(None)
        self.closing = True

    def _wake(self, _: None) -> None:
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)

    def _close_later(self) -> None:
        """Abort the TCP connection if the client has not closed it in time."""
        if self._close_timer is None and self.transport is not None:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(CLOSE_TIMEOUT, self.transport.abort)
