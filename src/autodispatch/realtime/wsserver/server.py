"""One upgraded connection of ``autodispatch serve``: ``RealtimeWebSocket``, the
``asyncio.Protocol`` uvicorn runs for each WebSocket upgrade.

It composes the other modules of this package: an upgrade to a realtime path is answered
by ``handshake``, its frames are read by ``reading`` and handed to the gateway's
``Connection``, and the connection's frames are written by ``writing`` (this class is its
wire: a ``SocketWire``). Any other upgrade is handed, bytes and all, to uvicorn's own
protocol, and through ASGI to the app.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from websockets.frames import Frame

from autodispatch.realtime.gateway import Connection, Gateway
from autodispatch.realtime.wsserver.handshake import handshake, realtime_path
from autodispatch.realtime.wsserver.reading import (
    MessageReader,
    deliver,
    frame_parser,
    request_parser,
)
from autodispatch.realtime.wsserver.writing import SocketWire


def protocol_for(gateway: Gateway) -> type[asyncio.Protocol]:
    """The class to give uvicorn as ``ws``: realtime paths served by ``gateway``."""
    return type("RealtimeWebSocket", (RealtimeWebSocket,), {"__slots__": (), "gateway": gateway})


class RealtimeWebSocket(SocketWire, asyncio.Protocol):
    """One upgraded connection: a realtime socket (this class is its wire), or another
    WebSocket route handed to uvicorn's protocol."""

    __slots__ = ("_connections", "_delegate", "_reader", "_setup", "conn")

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__()
        # uvicorn's arguments, kept only until the request says which path it is for.
        self._setup: tuple[Any, Any, dict[str, Any]] | None = (config, server_state, app_state)
        self._connections: set[Any] = server_state.connections  # uvicorn's, for shutdown
        self._delegate: asyncio.Protocol | None = None
        self._reader = MessageReader()
        self.conn: Connection | None = None

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
        self._transport_lost()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.lost()

    def shutdown(self) -> None:
        """uvicorn is stopping: close with 1012 (``announce_shutdown`` told each channel),
        now: frames still waiting for a slow client are dropped (it resumes)."""
        self._drop_backlog()
        if self.conn is not None:
            self.conn.close("shutdown")
        if self.transport is not None:
            self.transport.close()

    # -- the upgrade --------------------------------------------------------------------
    def _upgrade(self, head: bytes) -> None:
        assert self._setup is not None and self.transport is not None
        if not realtime_path(head):
            config, server_state, app_state = self._setup
            self._setup = None
            self._delegate = _uvicorn_default()(
                config=config, server_state=server_state, app_state=app_state
            )
            self._delegate.connection_made(self.transport)
            self._delegate.data_received(head)
            return
        self._connections.add(self)  # uvicorn shuts it down with the others
        self.ws = ws = request_parser()
        ws.receive_data(head)
        admitted = handshake(ws, self.gateway)
        self._flush_protocol()
        if admitted is None:
            self.transport.close()
            return
        vsn, principal = admitted
        self.sent = self.gateway.hub.metrics.sent.transport("websocket")
        self._setup = None
        # A fresh parser for the frames: the handshake's keeps the request (its headers,
        # about 2 KB) in its generator for the life of the connection.
        self.ws = frame_parser()
        self.conn = conn = Connection(self.gateway, vsn, principal, self)
        self.gateway.add(conn)

    # -- reading ------------------------------------------------------------------------
    def _receive(self, data: bytes) -> None:
        ws = self.ws
        assert ws is not None
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Frame):
                message = self._reader.message(event)
                if message is not None:
                    deliver(self.conn, *message)
        self._flush_protocol()
        if ws.close_expected() and not self.closing:
            # The client closed (or broke the protocol): nothing more to send.
            self._stop_writing()
            conn, self.conn = self.conn, None
            if conn is not None:
                conn.lost()
            self._close_later()


def _uvicorn_default() -> Callable[..., asyncio.Protocol]:
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    assert AutoWebSocketsProtocol is not None
    return AutoWebSocketsProtocol
