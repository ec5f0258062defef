"""WebSocket frames as the bench's clients read and write them once the handshake is done.

The handshake goes through the ``websockets`` package's sans-I/O client; after it, a
frame costs a subscriber process a few microseconds here instead of tens in a general
parser, so that on a 2-core machine the load generator takes as little CPU as possible
from the server it measures. Server frames are unmasked and, without extensions, have
no RSV bits (RFC 6455 section 5.2); anything else is a protocol error.
"""

from __future__ import annotations

import os

from websockets.utils import apply_mask

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class FrameError(Exception):
    """The server sent something that is not a valid unmasked frame."""


class ServerFrames:
    """Messages from a byte stream of server frames: ``feed`` returns the complete ones
    (fragments joined) as ``(opcode, payload)``, and keeps the incomplete tail."""

    __slots__ = ("_buffer", "_fragments", "_opcode")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fragments: list[bytes] | None = None
        self._opcode = OP_TEXT

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buffer
        buf += data
        size = len(buf)
        pos = 0
        out: list[tuple[int, bytes]] = []
        while size - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            if first & 0x70 or second & 0x80:
                raise FrameError(
                    f"RSV bits or a mask in a server frame: {bytes(buf[pos : pos + 2])!r}"
                )
            length = second & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            opcode, fin = first & 0x0F, first & 0x80
            payload = bytes(buf[start:end])
            pos = end
            if opcode >= OP_CLOSE:  # control frames are never fragmented
                out.append((opcode, payload))
            elif opcode == OP_CONT:
                if self._fragments is None:
                    raise FrameError("a continuation frame without a first fragment")
                self._fragments.append(payload)
                if fin:
                    out.append((self._opcode, b"".join(self._fragments)))
                    self._fragments = None
            elif fin:
                out.append((opcode, payload))
            else:
                self._opcode, self._fragments = opcode, [payload]
        del buf[:pos]
        return out


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A whole client frame: masked, as RFC 6455 requires of clients."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return head + mask + apply_mask(payload, mask)


def close_code(payload: bytes) -> int | None:
    """The status code of a close frame's payload (None: the frame carried none)."""
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
