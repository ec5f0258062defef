"""Live servers for the WebSocket tests: as ``autodispatch serve`` runs the app (the
realtime WebSocket paths served on the socket by the ``realtime/wsserver`` package), or
with the same protocol through the ASGI routes of ``realtime/websocket.py``, as any other
ASGI server would serve it. Test modules define their ``live`` fixture with ``serve_live``."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn

from autodispatch.app import create_app
from autodispatch.realtime.wsserver import protocol_for
from conftest import LiveServer, LiveWorld, make_settings

NATIVE = "native"
ASGI = "asgi"
WIRES = (NATIVE, ASGI)


class RealtimeLiveServer(LiveServer):
    """``LiveServer`` with the realtime WebSocket served natively (``wire="native"``, as
    ``serve`` does) or through ASGI (``wire="asgi"``)."""

    def __init__(
        self,
        db_url: str,
        tmp_path: Path,
        *,
        wire: str,
        uvicorn_options: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_base = f"ws://127.0.0.1:{self.port}"
        self.wire = wire
        self.settings = make_settings(tmp_path, **overrides)
        self.app = create_app(self.settings, db_url)
        ws: Any = protocol_for(self.app.state.gateway) if wire == NATIVE else "auto"
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            ws=ws,
            **(uvicorn_options or {}),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the live server did not start")
            time.sleep(0.02)


@asynccontextmanager
async def serve_live(
    db_url: str,
    tmp_path: Path,
    wire: str = NATIVE,
    uvicorn_options: dict[str, Any] | None = None,
    **overrides: Any,
) -> AsyncIterator[LiveWorld]:
    server = RealtimeLiveServer(
        db_url, tmp_path, wire=wire, uvicorn_options=uvicorn_options, **overrides
    )
    try:
        yield LiveWorld(server, db_url, {})
    finally:
        server.stop()
