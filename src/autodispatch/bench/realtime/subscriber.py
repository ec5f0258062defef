"""One subscriber process of `bench realtime`: WebSocket clients on asyncio transports
(no library client: thousands per process), timing each frame they get into a histogram,
and serving the parent's commands (open, close, reset, stats, quit)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import resource
import time
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from multiprocessing.connection import Connection
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Frame
from websockets.http11 import Response
from websockets.uri import parse_uri

from autodispatch.bench.realtime.frames import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    ServerFrames,
    client_frame,
    close_code,
)

_POSTGRES_CHANGES = b'"event":"postgres_changes"'
_COMMIT_TS = b'"commit_timestamp":"'
# Latency histogram: 0.1 ms buckets up to 10 s, then 10 ms buckets up to 300 s.
_FINE = 100_000
_HIST_LAST = _FINE + 29_000


def _bucket(latency: float) -> int:
    if latency < 10.0:
        return max(int(latency * 10_000), 0)
    return min(_FINE + int((latency - 10.0) * 100), _HIST_LAST)


def _bucket_ms(bucket: int) -> float:
    """The middle of a bucket, in milliseconds."""
    if bucket < _FINE:
        return (bucket + 0.5) / 10
    return 10_000 + (bucket - _FINE + 0.5) * 10


HEARTBEAT_SECONDS = 25.0  # as the stock clients


class _Stats:
    def __init__(self) -> None:
        self.received = 0
        self.control = 0
        self.hist = [0] * (_HIST_LAST + 1)
        self.max = 0.0
        self.closed: Counter[str] = Counter()
        self.timestamps: dict[bytes, float] = {}

    def timestamp(self, raw: bytes) -> float:
        ts = self.timestamps.get(raw)
        if ts is None:
            if len(self.timestamps) > 50_000:
                self.timestamps.clear()
            ts = datetime.fromisoformat(raw.decode()).timestamp()
            self.timestamps[raw] = ts
        return ts

    def snapshot(self, open_count: int) -> dict[str, Any]:
        return {
            "received": self.received,
            "control": self.control,
            "hist": {i: n for i, n in enumerate(self.hist) if n},
            "max": self.max,
            "closed": dict(self.closed),
            "open": open_count,
        }


class _Subscriber(asyncio.Protocol):
    """One WebSocket client: the handshake through websockets' sans-I/O client, then
    frames read and written by ``frames.py``; every row event is timed on arrival."""

    def __init__(self, client: _Client, index: int, url: str, join: str) -> None:
        self.client = client
        self.index = index
        self.handshake: ClientProtocol | None = ClientProtocol(parse_uri(url), max_size=None)
        self.frames: ServerFrames | None = None  # once the handshake is done
        self.join_frame = join
        self.transport: asyncio.Transport | None = None
        self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closing = False
        self.close_code: int | None = None
        self.next_heartbeat = time.monotonic() + HEARTBEAT_SECONDS * random.random()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport) and self.handshake is not None
        self.transport = transport
        self.handshake.send_request(self.handshake.connect())
        for chunk in self.handshake.data_to_send():
            transport.write(chunk)

    def send(self, text: str) -> None:
        if self.transport is not None and self.frames is not None:
            self.transport.write(client_frame(OP_TEXT, text.encode()))

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self.frames is None:
            self._handshake(data, now)
            return
        try:
            messages = self.frames.feed(data)
        except FrameError as exc:
            self._protocol_error(str(exc))
            return
        for opcode, payload in messages:
            self._message(opcode, payload, now)

    def _handshake(self, data: bytes, now: float) -> None:
        ws = self.handshake
        assert ws is not None
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Response):
                if event.status_code != 101:
                    self._fail(f"handshake refused: HTTP {event.status_code} {event.body!r}")
                    return
                self.frames, self.handshake = ServerFrames(), None
                self.send(self.join_frame)
            elif isinstance(event, Frame):  # arrived with the response
                self._message(int(event.opcode), bytes(event.data), now)

    def _message(self, opcode: int, payload: bytes, now: float) -> None:
        stats = self.client.stats
        if opcode == OP_TEXT:
            if payload.find(_POSTGRES_CHANGES, 0, 200) >= 0:
                start = payload.find(_COMMIT_TS) + len(_COMMIT_TS)
                end = payload.find(b'"', start)
                latency = now - stats.timestamp(payload[start:end])
                stats.received += 1
                stats.hist[_bucket(latency)] += 1
                if latency > stats.max:
                    stats.max = latency
            else:
                stats.control += 1
                self._control(json.loads(payload))
        elif opcode == OP_PING and self.transport is not None:
            self.transport.write(client_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            self.close_code = close_code(payload)
            self.close(self.close_code or 1000, ours=False)

    def _control(self, msg: dict[str, Any]) -> None:
        if self.joined.done():
            return
        payload = msg.get("payload") or {}
        if msg.get("event") == "phx_reply" and msg.get("ref") == "1":
            if payload.get("status") != "ok":
                self._fail(f"join refused: {payload}")
        elif msg.get("event") == "system":
            if payload.get("status") == "ok":
                self.joined.set_result(None)  # "Subscribed to PostgreSQL": live from now
            else:
                self._fail(f"join failed: {payload}")

    def _fail(self, why: str) -> None:
        if not self.joined.done():
            self.joined.set_exception(RuntimeError(why))

    def _protocol_error(self, why: str) -> None:
        self.client.stats.closed[f"protocol error: {why}"[:80]] += 1
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.subscribers.pop(self.index, None)
        if not self.closing:
            self.client.stats.closed[str(self.close_code or "dropped")] += 1
        self._fail(f"connection lost ({exc or self.close_code})")

    def close(self, code: int = 1000, *, ours: bool = True) -> None:
        """Close; ``ours=False`` answers the server's close frame (``connection_lost``
        then counts the server's code as a disconnect)."""
        self.closing = ours
        if self.transport is not None and not self.transport.is_closing():
            if self.frames is not None:
                self.transport.write(client_frame(OP_CLOSE, code.to_bytes(2, "big")))
            self.transport.close()


class _Client:
    """One subscriber process: opens, holds and closes connections on request."""

    def __init__(self, host: str, url: str) -> None:
        self.host = host
        self.url = url  # with a {port} to fill: the gateway each subscriber connects to
        self.stats = _Stats()
        self.subscribers: dict[int, _Subscriber] = {}

    async def open(self, items: list[tuple[int, str, int]]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        gate = asyncio.Semaphore(64)
        errors: list[str] = []

        async def one(index: int, join: str, port: int) -> None:
            url = self.url.format(port=port)
            async with gate:
                try:
                    _, sub = await loop.create_connection(
                        lambda: _Subscriber(self, index, url, join), self.host, port
                    )
                    self.subscribers[index] = sub
                    await asyncio.wait_for(sub.joined, timeout=60)
                except (OSError, RuntimeError, TimeoutError) as exc:
                    errors.append(f"subscriber {index}: {exc}")
                    if index in self.subscribers:
                        self.subscribers.pop(index).close()

        await asyncio.gather(*(one(i, join, port) for i, join, port in items))
        return {
            "opened": len(items) - len(errors),
            "errors": errors[:5],
            "failed": len(errors),
            "seconds": time.perf_counter() - started,
        }

    def close(self, indices: Iterable[int]) -> dict[str, Any]:
        for index in indices:
            sub = self.subscribers.pop(index, None)
            if sub is not None:
                sub.close()
        return {"open": len(self.subscribers)}

    async def heartbeats(self) -> None:
        frame = json.dumps({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "hb"})
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for sub in list(self.subscribers.values()):
                if now >= sub.next_heartbeat and sub.joined.done():
                    sub.next_heartbeat = now + HEARTBEAT_SECONDS
                    sub.send(frame)


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def subscriber_process(conn: Connection, host: str, url: str) -> None:
    """Entry point of a subscriber process: serve the parent's commands until "quit"."""
    raise_fd_limit()
    asyncio.run(_serve_commands(conn, _Client(host, url)))


async def _serve_commands(conn: Connection, client: _Client) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    loop.add_reader(conn.fileno(), lambda: commands.put_nowait(conn.recv()))
    heartbeats = asyncio.create_task(client.heartbeats())
    try:
        while True:
            command = await commands.get()
            kind = command[0]
            if kind == "open":
                reply: Any = await client.open(command[1])
            elif kind == "close":
                reply = client.close(command[1])
            elif kind == "reset":
                client.stats = _Stats()
                reply = {"open": len(client.subscribers)}
            elif kind == "stats":
                reply = client.stats.snapshot(len(client.subscribers))
            else:  # quit
                client.close(list(client.subscribers))
                await asyncio.sleep(0.2)
                conn.send({"bye": True})
                return
            conn.send(reply)
    finally:
        heartbeats.cancel()


def percentile(hist: Counter[int], q: float) -> float:
    """The q-quantile of a latency histogram, in milliseconds."""
    total = sum(hist.values())
    if not total:
        return float("nan")
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= q * total:
            return _bucket_ms(bucket)
    return _bucket_ms(max(hist))
