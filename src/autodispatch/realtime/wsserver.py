"""The realtime WebSocket served straight on the socket, as uvicorn's WebSocket protocol.

``autodispatch serve`` gives uvicorn ``protocol_for(gateway)`` as its ``ws`` protocol
class. An upgrade to ``/realtime/v1/websocket`` or ``/socket/websocket`` is then handled
here, without ASGI: no task, queue or event per connection, and a row event costs each
recipient one ``transport.write`` of frame bytes built once for everyone on the same
topic, binding ids and vsn (server frames are unmasked, so they are the same bytes for
every recipient). Any other upgrade goes to uvicorn's own protocol, and through ASGI to
the app. The protocol itself (joins, channels, limits) is ``gateway.py``, shared with
the ASGI routes of ``websocket.py``.

Incoming frames are parsed by the ``websockets`` package's sans-I/O ``ServerProtocol``
(handshake, masking, fragments, ping/pong, the closing handshake). Outgoing data frames
are written here; while the reader routes a batch of events (``gateway.WriteBatch``),
each connection's frames are gathered and written with one call.

Backpressure: the transport buffers what the kernel does not take yet; past its high
water mark frames wait in a backlog of at most ``Limits.queue_size`` frames. A write
that finds the backlog full fails, the reader then waits (up to
``slow_consumer_seconds``) for room, and a client that still has not read is closed
with 4000 ``slow_consumer``; it resumes from its cursor and loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar, cast
from urllib.parse import parse_qs, unquote

from websockets.datastructures import Headers
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from autodispatch.domain.errors import AppError
from autodispatch.realtime import protocol as p
from autodispatch.realtime.events import Event
from autodispatch.realtime.gateway import CLOSE_CODES, CONTROL_ROOM, Connection, Gateway
from autodispatch.realtime.metrics import SentFrames

PATHS = frozenset({"/realtime/v1/websocket", "/socket/websocket"})
MAX_MESSAGE = 16 * 1024 * 1024  # larger messages close the socket (1009); see Limits
CLOSE_TIMEOUT = 10.0  # after our close frame, how long the client has to answer
_FIN_TEXT = 0x81
_FIN_BINARY = 0x82


class _Quiet(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets logs each open and refused connection at INFO; here that is DEBUG (a
    gateway opens thousands; the metrics count them)."""

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)


_PROTOCOL_LOG = _Quiet(logging.getLogger("autodispatch.realtime.wsserver"))


def frame_bytes(payload: bytes, first: int = _FIN_TEXT) -> bytes:
    """A whole, unmasked server frame (RFC 6455 section 5.2) carrying ``payload``."""
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return bytes((first, 126)) + size.to_bytes(2, "big") + payload
    return bytes((first, 127)) + size.to_bytes(8, "big") + payload


def protocol_for(gateway: Gateway) -> type[asyncio.Protocol]:
    """The class to give uvicorn as ``ws``: realtime paths served by ``gateway``."""
    return type("RealtimeWebSocket", (RealtimeWebSocket,), {"__slots__": (), "gateway": gateway})


class RealtimeWebSocket(asyncio.Protocol):
    """One upgraded connection: a realtime socket (this class is its wire), or another
    WebSocket route handed to uvicorn's protocol."""

    gateway: ClassVar[Gateway]
    kind = "native"

    __slots__ = (
        "_backlog",
        "_close_timer",
        "_connections",
        "_delegate",
        "_fragments",
        "_fragments_text",
        "_gathered",
        "_room",
        "_setup",
        "closing",
        "conn",
        "paused",
        "sent",
        "transport",
        "ws",
    )

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # uvicorn's arguments, kept only until the request says which path it is for.
        self._setup: tuple[Any, Any, dict[str, Any]] | None = (config, server_state, app_state)
        self._connections: set[Any] = server_state.connections  # uvicorn's, for shutdown
        self._delegate: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.ws: ServerProtocol | None = None
        self.conn: Connection | None = None
        self.closing = False
        self.paused = False
        self.sent: SentFrames | None = None
        self._backlog: deque[tuple[bytes, Event | None]] | None = None
        self._gathered: list[tuple[bytes, Event | None]] | None = None  # see WriteBatch
        self._room: asyncio.Future[None] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._fragments: list[bytes] | None = None
        self._fragments_text = False

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._delegate is not None:
            self._delegate.data_received(data)
        elif self.ws is None:
            self._upgrade(data)
        else:
            self._receive(data)

    def eof_received(self) -> bool | None:
        if self._delegate is not None:
            return self._delegate.eof_received()
        return None

    def pause_writing(self) -> None:
        if self._delegate is not None:
            self._delegate.pause_writing()
        self.paused = True

    def resume_writing(self) -> None:
        if self._delegate is not None:
            self._delegate.resume_writing()
            return
        self.paused = False
        self._drain()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._delegate is not None:
            self._delegate.connection_lost(exc)
            return
        self._connections.discard(self)
        self._setup = None
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._backlog = None
        self._wake(None)
        conn, self.conn = self.conn, None
        self.closing = True
        if conn is not None:
            conn.lost()

    def shutdown(self) -> None:
        """uvicorn is stopping: close with 1012 (``announce_shutdown`` told each channel),
        now: frames still waiting for a slow client are dropped (it resumes)."""
        self._backlog = None
        if self.conn is not None:
            self.conn.close("shutdown")
        if self.transport is not None:
            self.transport.close()

    # -- the handshake --------------------------------------------------------------------
    def _upgrade(self, head: bytes) -> None:
        assert self._setup is not None and self.transport is not None
        config, server_state, app_state = self._setup
        target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
        if unquote(target.split(b"?", 1)[0].decode("latin-1")) not in PATHS:
            self._setup = None
            self._delegate = _uvicorn_default()(
                config=config, server_state=server_state, app_state=app_state
            )
            self._delegate.connection_made(self.transport)
            self._delegate.data_received(head)
            return
        self._connections.add(self)  # uvicorn shuts it down with the others
        self.ws = ws = ServerProtocol(max_size=MAX_MESSAGE, logger=_PROTOCOL_LOG)
        ws.receive_data(head)
        request = next((e for e in ws.events_received() if isinstance(e, Request)), None)
        if request is None:
            self._flush_protocol()
            self.transport.close()
            return
        response = ws.accept(request)
        if response.status_code != 101:  # not a valid WebSocket handshake
            ws.send_response(response)
            self._flush_protocol()
            self.transport.close()
            return
        refusal, conn = self._open(request)
        if refusal is not None:
            status, message = refusal
            body = json.dumps({"error": message}).encode()
            headers = Headers(
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                ]
            )
            ws.send_response(Response(status, _PHRASES.get(status, ""), headers, body))
            self._flush_protocol()
            self.transport.close()
            return
        ws.send_response(response)
        self._flush_protocol()
        # A fresh parser for the frames: the handshake's keeps the request (its headers,
        # about 2 KB) in its generator for the life of the connection.
        self.ws = ServerProtocol(state=OPEN, max_size=MAX_MESSAGE, logger=_PROTOCOL_LOG)
        self.conn = conn
        assert conn is not None
        self.gateway.add(conn)

    def _open(self, request: Request) -> tuple[tuple[int, str] | None, Connection | None]:
        """The connection for this request, or why not (an HTTP status and message)."""
        gateway = self.gateway
        query = parse_qs(request.path.partition("?")[2])
        vsn = (query.get("vsn") or [""])[0] or p.VSN_1
        if vsn not in p.VSNS:
            return (400, f"UnsupportedVsn: use {p.VSN_1} or {p.VSN_2}"), None
        apikey = request.headers.get("x-api-key") or (query.get("apikey") or [""])[0]
        if not apikey:
            return (401, "apikey is required (query ?apikey= or header x-api-key)"), None
        try:
            principal = gateway.tokens.principal(apikey)
        except AppError as exc:
            return (401, exc.message), None
        if gateway.full():
            gateway.hub.metrics.disconnects.labels("websocket", "too_many_connections").inc()
            return (429, "ConnectionRateLimitReached: Too many connections"), None
        self.sent = gateway.hub.metrics.sent.transport("websocket")
        self._setup = None
        return None, Connection(gateway, vsn, principal, self)

    # -- reading --------------------------------------------------------------------------
    def _receive(self, data: bytes) -> None:
        ws = self.ws
        assert ws is not None
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Frame):
                self._frame(event)
        self._flush_protocol()
        if ws.close_expected() and not self.closing:
            # The client closed (or broke the protocol): nothing more to send.
            self.closing = True
            self._backlog = None
            conn, self.conn = self.conn, None
            if conn is not None:
                conn.lost()
            self._close_later()

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._message(opcode, bytes(frame.data))
            else:
                self._fragments = [bytes(frame.data)]
                self._fragments_text = opcode is Opcode.TEXT
        elif opcode is Opcode.CONT and self._fragments is not None:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), None
                self._message(Opcode.TEXT if self._fragments_text else Opcode.BINARY, data)
        # PING is answered and CLOSE acknowledged by ServerProtocol itself.

    def _message(self, opcode: Opcode, data: bytes) -> None:
        conn = self.conn
        if conn is None or conn.closing is not None:
            return
        if opcode is Opcode.TEXT:
            try:
                raw: str | bytes = data.decode()
            except UnicodeDecodeError:
                conn.close("invalid_utf8")
                return
        else:
            raw = data
        conn.receive(raw)

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

    # -- helpers ----------------------------------------------------------------------------
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

    def _wake(self, _: None) -> None:
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)

    def _flush_protocol(self) -> None:
        """Write what ServerProtocol has to send (handshake responses, pongs, close
        frames); an empty chunk means: close the TCP connection."""
        assert self.ws is not None and self.transport is not None
        for chunk in self.ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
            else:
                self.transport.close()

    def _close_later(self) -> None:
        """Abort the TCP connection if the client has not closed it in time."""
        if self._close_timer is None and self.transport is not None:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(CLOSE_TIMEOUT, self.transport.abort)


_PHRASES = {400: "Bad Request", 401: "Unauthorized", 429: "Too Many Requests"}


def _uvicorn_default() -> Callable[..., asyncio.Protocol]:
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    assert AutoWebSocketsProtocol is not None
    return AutoWebSocketsProtocol
