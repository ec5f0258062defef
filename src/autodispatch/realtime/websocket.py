"""The realtime WebSocket through ASGI, for any ASGI server.

``autodispatch serve`` answers ``/realtime/v1/websocket`` and ``/socket/websocket``
itself (``wsserver``: frames written straight to the socket, no task per connection);
these routes serve the same protocol (``gateway``) under any other server. Each
socket has a bounded queue of outgoing frames drained by a writer task; a client too
slow to drain it is closed with the reason ``slow_consumer`` (code 4000) and resumes
from its cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from autodispatch.realtime import protocol as p
from autodispatch.realtime.events import Event
from autodispatch.realtime.gateway import (
    CLOSE_CODES,
    CONTROL_ROOM,
    Connection,
    Gateway,
    Limits,
    Refusal,
    admit,
)
from autodispatch.realtime.metrics import SentFrames

__all__ = ["Gateway", "Limits", "router"]

router = APIRouter()


class AsgiWire:
    """A connection's frames through ASGI: a bounded queue and a writer task."""

    kind = "asgi"

    def __init__(self, ws: WebSocket, queue_size: int, sent: SentFrames) -> None:
        self.ws = ws
        self.sent = sent
        self.queue_size = queue_size  # row frames; control frames get CONTROL_ROOM more
        self.queue: asyncio.Queue[tuple[str | bytes, Event | None] | None] = asyncio.Queue()
        self.closing: str | None = None
        self._room = asyncio.Event()  # set each time the writer takes a frame

    def prepare(self, frame: str | bytes) -> str | bytes:
        return frame

    def write(self, frame: Any, event: Event | None) -> bool:
        if self.closing is not None:
            return False
        limit = self.queue_size + (CONTROL_ROOM if event is None else 0)
        if self.queue.qsize() >= limit:
            return False
        self.queue.put_nowait((frame, event))
        return True

    async def write_wait(self, frame: Any, event: Event | None, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.write(frame, event):
            left = deadline - time.monotonic()
            if self.closing is not None or left <= 0:
                return False
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), left)
        return True

    def close(self, reason: str) -> None:
        if self.closing is None:
            self.closing = reason
            self.queue.put_nowait(None)
            self._room.set()

    async def writer(self) -> None:
        while True:
            item = await self.queue.get()
            self._room.set()
            # A slow consumer gets nothing more: its cursor is the last event it received.
            if item is None or self.closing == "slow_consumer":
                return
            frame, event = item
            if isinstance(frame, bytes):
                await self.ws.send_bytes(frame)
            else:
                await self.ws.send_text(frame)
            if event is not None:
                self.sent.sent(time.time() - event.at_ts)


def _vsn(ws: WebSocket) -> str:
    return ws.query_params.get("vsn") or p.VSN_1


async def _refuse(ws: WebSocket, status: int, message: str) -> None:
    """Refuse the upgrade with an HTTP error (when the server supports it)."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse({"error": message}, status_code=status))
    else:
        await ws.close(code=1008, reason=message[:120])


async def serve_socket(ws: WebSocket) -> None:
    gateway: Gateway = ws.app.state.gateway
    vsn = _vsn(ws)
    principal = admit(gateway, vsn, ws.headers.get("x-api-key") or ws.query_params.get("apikey"))
    if isinstance(principal, Refusal):
        await _refuse(ws, principal.status, principal.message)
        return
    await ws.accept()
    wire = AsgiWire(ws, gateway.limits.queue_size, gateway.hub.metrics.sent.transport("websocket"))
    conn = Connection(gateway, vsn, principal, wire)
    gateway.add(conn)
    writer = asyncio.create_task(wire.writer(), name="ws-writer")
    reason = "client_closed"
    try:
        while conn.closing is None:
            receive = asyncio.create_task(ws.receive())
            done, _ = await asyncio.wait({receive, writer}, return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                break
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes") or b""
            msg = conn.parse(raw)
            if msg is not None:
                await conn.handle_message(msg)
        if conn.closing is not None:
            reason = conn.closing
    except WebSocketDisconnect:
        pass
    finally:
        await conn.finish(reason)
        wire.close(reason)
        if not writer.done():
            writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer
        if ws.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await ws.close(code=CLOSE_CODES.get(reason, 1000), reason=reason)


@router.websocket("/realtime/v1/websocket")
async def hosted_path(ws: WebSocket) -> None:
    await serve_socket(ws)


@router.websocket("/socket/websocket")
async def upstream_path(ws: WebSocket) -> None:
    await serve_socket(ws)
