"""What a connection asks of the transport that writes its frames: the ``Wire``.

A connection never touches a socket. It prepares a frame once (``Wire.prepare``; frames
are shared between the connections of one kind), writes it without waiting, or waits a
bounded time for room, and closes saying why. Two transports implement it: the native
server (``wsserver``: straight to the socket, a backlog past the transport's high water
mark) and the ASGI routes (``websocket.py``: a bounded queue and a writer task). Both
bound what waits for a client by ``Limits.queue_size`` row frames, plus ``CONTROL_ROOM``
for control frames; a client that cannot keep up is closed with ``slow_consumer`` (code
``SLOW_CONSUMER``): it resumes from its cursor and loses nothing.

While the reader routes a batch of events, wires that can gather each connection's frames
and write them with one call (``WriteBatch``).
"""

from __future__ import annotations

from typing import Any, Protocol

from autodispatch.realtime.events import Event

SLOW_CONSUMER = 4000  # close code of a client that fell too far behind (private range)
CLOSE_CODES = {"slow_consumer": SLOW_CONSUMER, "shutdown": 1012, "invalid_utf8": 1007}
# Control frames (replies, heartbeats, presence, broadcasts) may go past a queue that row
# events filled by this many: a resume waiting for room (it keeps the queue full while the
# client reads) must not turn the client's heartbeat reply into a slow-consumer close.
CONTROL_ROOM = 64


class Wire(Protocol):
    """Where a connection's frames go. ``kind`` names what a prepared frame is (frames
    are shared between the connections of one kind)."""

    kind: str

    def prepare(self, frame: str | bytes) -> Any:
        """A text (str) or binary (bytes) frame as this wire writes it."""
        ...

    def write(self, frame: Any, event: Event | None) -> bool:
        """Write or queue a prepared frame now; False (and nothing else) when full or closed."""
        ...

    async def write_wait(self, frame: Any, event: Event | None, timeout: float) -> bool:
        """Write a prepared frame, waiting up to ``timeout`` for room; False if none came."""
        ...

    def close(self, reason: str) -> None:
        """Send nothing more but what must precede the close, then close saying why."""
        ...


class Gathering(Protocol):
    """A wire holding frames gathered during a batch (``WriteBatch``)."""

    def write_gathered(self) -> None: ...


class WriteBatch:
    """While the reader routes a batch of events, wires that can (the native server)
    gather each connection's frames and write them with one call at ``end``: one system
    call per recipient of the batch instead of one per frame."""

    __slots__ = ("active", "gathering")

    def __init__(self) -> None:
        self.active = False
        self.gathering: list[Gathering] = []

    def begin(self) -> None:
        self.active = True

    def end(self) -> None:
        self.active = False
        gathering, self.gathering = self.gathering, []
        for wire in gathering:
            wire.write_gathered()
