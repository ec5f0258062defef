"""The bench's own frame reader and writer (bench/realtime/frames.py) agree with the
websockets package: what a server writes, the bench's clients read; what they write, a
server reads."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from autodispatch.bench.realtime.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    FrameError,
    ServerFrames,
    client_frame,
    close_code,
)


def server_frame(opcode: Opcode, data: bytes, *, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin=fin).serialize(mask=False)


def test_messages_are_read_whatever_the_reads_cut() -> None:
    """Frames of every length encoding, a fragmented message with a ping between its
    fragments, and a close: fed in pieces of every size, the same messages come out."""
    stream = b"".join(
        [
            server_frame(Opcode.TEXT, b"hello"),
            server_frame(Opcode.TEXT, b"a" * 300),
            server_frame(Opcode.BINARY, bytes(range(256)) * 300),
            server_frame(Opcode.TEXT, b"frag-1 ", fin=False),
            server_frame(Opcode.PING, b"p"),
            server_frame(Opcode.CONT, b"frag-2 ", fin=False),
            server_frame(Opcode.CONT, b"frag-3", fin=True),
            server_frame(Opcode.CLOSE, (4000).to_bytes(2, "big") + b"slow_consumer"),
        ]
    )
    expected = [
        (OP_TEXT, b"hello"),
        (OP_TEXT, b"a" * 300),
        (OP_BINARY, bytes(range(256)) * 300),
        (OP_PING, b"p"),
        (OP_TEXT, b"frag-1 frag-2 frag-3"),
        (OP_CLOSE, (4000).to_bytes(2, "big") + b"slow_consumer"),
    ]
    for piece in (1, 2, 3, 7, 125, 4096, len(stream)):
        frames = ServerFrames()
        got = []
        for start in range(0, len(stream), piece):
            got += frames.feed(stream[start : start + piece])
        assert got == expected, piece
    assert close_code(expected[-1][1]) == 4000


def test_masked_or_extended_frames_are_refused() -> None:
    """A server frame with a mask or an RSV bit is a protocol error, not a message."""
    with pytest.raises(FrameError):
        ServerFrames().feed(Frame(Opcode.TEXT, b"x").serialize(mask=True))
    with pytest.raises(FrameError):
        ServerFrames().feed(bytes((0x80 | 0x40 | 0x1, 1)) + b"x")


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_client_frames_are_masked_frames_a_server_reads(size: int) -> None:
    payload = bytes(i % 256 for i in range(size))
    reader = StreamReader()
    reader.feed_data(client_frame(OP_TEXT, payload))
    parser = Frame.parse(reader.read_exact, mask=True)
    with pytest.raises(StopIteration) as done:
        next(parser)
    frame: Frame = done.value.value
    assert (frame.opcode, bytes(frame.data)) == (Opcode.TEXT, payload)
