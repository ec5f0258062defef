"""What a client sends a native realtime socket, parsed and handed to its connection.

The ``websockets`` package's sans-I/O ``ServerProtocol`` parses the bytes: the upgrade
request, then frames (masking, ping/pong, the closing handshake; PING is answered and
CLOSE acknowledged by ServerProtocol itself, its answers written by the wire). Here a
message split into fragments is put together (``MessageReader``), and each whole
message is handed to the connection (``deliver``): a text message that is not UTF-8
closes the socket with 1007.
"""

from __future__ import annotations

import logging
from typing import Any

from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from autodispatch.realtime.gateway import Connection

MAX_MESSAGE = 16 * 1024 * 1024  # larger messages close the socket (1009); see Limits


class _Quiet(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets logs each open and refused connection at INFO; here that is DEBUG (a
    gateway opens thousands; the metrics count them)."""

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)


_PROTOCOL_LOG = _Quiet(logging.getLogger("autodispatch.realtime.wsserver"))


def request_parser() -> ServerProtocol:
    """A parser for a new socket's first bytes: the upgrade request."""
    return ServerProtocol(max_size=MAX_MESSAGE, logger=_PROTOCOL_LOG)


def frame_parser() -> ServerProtocol:
    """A parser for the frames of a socket whose upgrade was accepted."""
    return ServerProtocol(state=OPEN, max_size=MAX_MESSAGE, logger=_PROTOCOL_LOG)


class MessageReader:
    """Data frames in, whole messages out: fragments are put together."""

    __slots__ = ("_fragments", "_fragments_text")

    def __init__(self) -> None:
        self._fragments: list[bytes] | None = None
        self._fragments_text = False

    def message(self, frame: Frame) -> tuple[Opcode, bytes] | None:
        """The message ``frame`` completes (TEXT or BINARY, and its data), if any."""
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                return opcode, bytes(frame.data)
            self._fragments = [bytes(frame.data)]
            self._fragments_text = opcode is Opcode.TEXT
        elif opcode is Opcode.CONT and self._fragments is not None:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), None
                return Opcode.TEXT if self._fragments_text else Opcode.BINARY, data
        # PING is answered and CLOSE acknowledged by ServerProtocol itself.
        return None


def deliver(conn: Connection | None, opcode: Opcode, data: bytes) -> None:
    """Hand one whole message to the connection (none once it is closing)."""
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
