"""The machine's floor for one fan-out: how late the median frame of a burst lands when
the sender does nothing else.

One thread writes the same prebuilt frame (it holds the burst's start time) to each of
``recipients`` loopback TCP sockets, one ``send`` each, as the gateway does; reader
processes take the sockets in turns and time every arrival against that start. No
database, no NOTIFY, no routing, no WebSocket framing on either side, readers lighter
than the bench's clients: whatever the gateway does, its frames cannot land sooner on
this machine. The gateway's latency adds the commit-to-read time (the server's
``autodispatch_realtime_commit_to_read_seconds``) and its own work to this.
"""

from __future__ import annotations

import multiprocessing
import selectors
import socket
import struct
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

FRAME_BYTES = 2000  # about a row event's frame in this bench (with `columns`)
_END = b"E"


@dataclass
class Floor:
    recipients: int
    bursts: int
    frames: int  # timed arrivals (recipients x bursts when nothing was lost)
    p50_ms: float
    p99_ms: float
    burst_ms: float  # median time to write one burst


def _reader(port: int, count: int, conn: Connection) -> None:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, sock)
    conn.send("ready")
    pending = {sock: b"" for sock in socks}
    latencies: list[float] = []
    open_count = count
    while open_count:
        for key, _ in selector.select():
            sock = key.data
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            now = time.time()
            data = pending[sock] + data
            whole = len(data) - len(data) % FRAME_BYTES
            for offset in range(0, whole, FRAME_BYTES):
                if data[offset : offset + 1] == _END:
                    selector.unregister(sock)
                    open_count -= 1
                    break
                (started,) = struct.unpack_from("d", data, offset + 1)
                latencies.append(now - started)
            else:
                pending[sock] = data[whole:]
    conn.send(latencies)


def _send(sock: socket.socket, data: bytes) -> None:
    """One non-blocking send; in the rare case the kernel does not take it all, the rest
    waits (nothing is dropped)."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        sock.setblocking(True)
        sock.sendall(data[sent:])
        sock.setblocking(False)


def measure_floor(
    recipients: int, *, processes: int = 2, bursts: int = 150, interval: float = 0.075
) -> Floor:
    """Write ``bursts`` bursts (``interval`` s apart) to ``recipients`` sockets read by
    ``processes`` reader processes; the percentiles are over every frame."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(recipients + 16)
    port = listener.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    readers = []
    for i in range(processes):
        mine, theirs = ctx.Pipe()
        count = recipients // processes + (1 if i < recipients % processes else 0)
        proc = ctx.Process(target=_reader, args=(port, count, theirs), daemon=True)
        proc.start()
        pipes.append(mine)
        readers.append(proc)
    socks: list[socket.socket] = []
    try:
        for _ in range(recipients):
            sock, _ = listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)  # as the gateway's sockets
            socks.append(sock)
        for pipe in pipes:
            if pipe.recv() != "ready":
                raise RuntimeError("a floor reader did not start")
        padding = b"x" * (FRAME_BYTES - 9)
        burst_seconds: list[float] = []
        for _ in range(bursts):
            started = time.time()
            frame = b"T" + struct.pack("d", started) + padding
            for sock in socks:
                _send(sock, frame)
            burst_seconds.append(time.time() - started)
            time.sleep(interval)
        end = _END * FRAME_BYTES
        for sock in socks:
            _send(sock, end)
        latencies = sorted(lat for pipe in pipes for lat in pipe.recv())
    finally:
        for sock in socks:
            sock.close()
        listener.close()
        for proc in readers:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    if not latencies:
        raise RuntimeError("no frame of the floor measurement arrived")
    burst_seconds.sort()
    return Floor(
        recipients=recipients,
        bursts=bursts,
        frames=len(latencies),
        p50_ms=latencies[len(latencies) // 2] * 1000,
        p99_ms=latencies[min(int(len(latencies) * 0.99), len(latencies) - 1)] * 1000,
        burst_ms=burst_seconds[len(burst_seconds) // 2] * 1000,
    )
