"""The WebSocket transport, speaking the Supabase Realtime protocol (Phoenix channels).

Served at ``/realtime/v1/websocket`` (hosted path) and ``/socket/websocket`` (upstream).
One ``Connection`` per socket with a bounded queue of outgoing frames (a client too
slow to drain it is closed with the reason ``SlowConsumer`` and resumes from its
cursor); one ``Channel`` per joined topic. Row events come from the hub's router; the
join reply goes out before any of them, and "Subscribed to PostgreSQL" only once the
subscription is registered (and any resume replayed), so it is true when sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from autodispatch.domain.errors import AppError
from autodispatch.domain.principal import Principal
from autodispatch.identity.tokens import TokenIssuer
from autodispatch.realtime import protocol as p
from autodispatch.realtime.broker import Broker, PayloadTooLarge
from autodispatch.realtime.events import Event
from autodispatch.realtime.hub import Hub, ResyncRequired
from autodispatch.realtime.router import Binding, Subscription

log = structlog.get_logger("autodispatch.realtime")
router = APIRouter()

SLOW_CONSUMER = 4000  # close code of a client that fell too far behind (private range)


@dataclass(frozen=True)
class Limits:
    """Per-process and per-connection limits; each refusal has a stable code."""

    connections: int = 10_000
    channels_per_connection: int = 100
    joins_per_second: int = 50
    messages_per_second: int = 500
    payload_bytes: int = 256 * 1024
    queue_size: int = 1000
    heartbeat_timeout: float = 60.0
    # A client whose queue stays full this long is a slow consumer and is closed.
    slow_consumer_seconds: float = 2.0


class RateWindow:
    """At most ``limit`` events in any one-second window."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.times: deque[float] = deque()

    def allow(self) -> bool:
        now = time.monotonic()
        while self.times and now - self.times[0] > 1.0:
            self.times.popleft()
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True


class Gateway:
    """State shared by this process's sockets."""

    def __init__(self, hub: Hub, broker: Broker, tokens: TokenIssuer, limits: Limits) -> None:
        self.hub = hub
        self.broker = broker
        self.tokens = tokens
        self.limits = limits
        self.connections: set[Connection] = set()

    def announce_shutdown(self) -> None:
        """Tell every channel the server is going away (uvicorn then closes with 1012);
        clients reconnect, to this server or another, and resume from their cursor."""
        for conn in list(self.connections):
            for channel in list(conn.channels.values()):
                conn.send(p.system_error(channel.topic, "system", "ServerShutdown: reconnect"))


class Channel:
    def __init__(
        self,
        conn: Connection,
        topic: str,
        join_ref: str | None,
        config: p.JoinConfig,
        principal: Principal,
    ) -> None:
        self.conn = conn
        self.topic = topic
        self.join_ref = join_ref
        self.config = config
        self.principal = principal
        self.subscription: Subscription | None = None
        self.presence_key = config.presence_key or str(id(self))
        self.presence_refs: set[str] = set()
        self._held: list[tuple[Event, str]] | None = []  # frames held until the join reply

    # -- row events (the router calls offer, and wait_offer when the queue was full) ----
    def offer(self, event: Event, ids: list[int], data_json: str) -> bool:
        frame = p.postgres_changes_frame(self.topic, ids, data_json, self.conn.vsn)
        if self._held is not None:
            self._held.append((event, frame))
            return True
        return self.conn.try_enqueue(frame, event)

    async def wait_offer(
        self, event: Event, ids: list[int], data_json: str, timeout: float
    ) -> bool:
        frame = p.postgres_changes_frame(self.topic, ids, data_json, self.conn.vsn)
        if self._held is not None:
            self._held.append((event, frame))
            return True
        return await self.conn.put(frame, event, timeout)

    def close(self, reason: str) -> None:
        self.conn.close(reason)

    async def open(self, timeout: float) -> None:
        """After the join reply: release the frames held meanwhile (a resume's replay, and
        live events that arrived during it), in order, waiting for room in the queue; then
        go live. Frames offered while this waits are held too, so order is kept."""
        held = self._held or []
        while held:
            event, frame = held.pop(0)
            if not await self.conn.put(frame, event, timeout):
                self.conn.close("slow_consumer")
                return
        self._held = None

    # -- broadcast and presence (the broker calls these) --------------------------------
    def on_broadcast(self, event: str, payload: Any, sender: object | None) -> None:
        if sender is self and not self.config.broadcast_self:
            return
        self.conn.send(p.broadcast(self.topic, event, payload))

    def on_presence_diff(self, joins: dict[str, Any], leaves: dict[str, Any]) -> None:
        if self.config.presence_enabled:
            self.conn.send(p.presence_diff(self.topic, joins, leaves))

    @property
    def expires_at(self) -> float | None:
        exp = self.principal.claims.get("exp")
        return float(exp) if exp is not None else None


class Connection:
    def __init__(self, ws: WebSocket, gateway: Gateway, vsn: str, principal: Principal) -> None:
        self.ws = ws
        self.gateway = gateway
        self.vsn = vsn
        self.principal = principal  # from the socket's apikey
        self.channels: dict[str, Channel] = {}
        self.queue: asyncio.Queue[tuple[str | bytes, Event | None] | None] = asyncio.Queue(
            gateway.limits.queue_size
        )
        self.closing: str | None = None
        self.last_seen = time.monotonic()
        self.joins = RateWindow(gateway.limits.joins_per_second)
        self.messages = RateWindow(gateway.limits.messages_per_second)
        self._ids = itertools.count(1)

    # -- sending ------------------------------------------------------------------------
    def send(self, msg: p.Message) -> bool:
        try:
            frame = p.encode(msg, self.vsn)
        except p.ProtocolError as exc:
            log.warning("unencodable_message", error=str(exc))
            return False
        return self.enqueue(frame, None)

    def enqueue(self, frame: str | bytes, event: Event | None) -> bool:
        """Queue a frame; a full queue closes the connection (it cannot keep up)."""
        if self.try_enqueue(frame, event):
            return True
        self.close("slow_consumer")
        return False

    def try_enqueue(self, frame: str | bytes, event: Event | None) -> bool:
        """Queue a frame if there is room; False (and nothing else) when full."""
        if self.closing is not None:
            return False
        try:
            self.queue.put_nowait((frame, event))
        except asyncio.QueueFull:
            return False
        return True

    async def put(self, frame: str | bytes, event: Event | None, timeout: float) -> bool:
        """Queue a frame, waiting up to ``timeout`` for room; False if it never came."""
        if self.closing is not None:
            return False
        try:
            await asyncio.wait_for(self.queue.put((frame, event)), timeout)
        except TimeoutError:
            return False
        return self.closing is None

    def close(self, reason: str) -> None:
        if self.closing is None:
            self.closing = reason
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)

    async def writer(self) -> None:
        metrics = self.gateway.hub.metrics
        while True:
            item = await self.queue.get()
            # A slow consumer gets nothing more: its cursor is the last event it received.
            if item is None or self.closing == "slow_consumer":
                return
            frame, event = item
            if isinstance(frame, bytes):
                await self.ws.send_bytes(frame)
            else:
                await self.ws.send_text(frame)
            if event is not None:
                metrics.delivered.labels("websocket").inc()
                metrics.commit_to_send.labels("websocket").observe(
                    max((datetime.now(UTC) - event.at).total_seconds(), 0.0)
                )

    # -- receiving ------------------------------------------------------------------------
    async def handle(self, raw: str | bytes) -> None:
        self.last_seen = time.monotonic()
        limits = self.gateway.limits
        if len(raw) > limits.payload_bytes:
            self.send_error_reply(
                None,
                None,
                "phoenix",
                "PayloadTooLarge",
                f"frames are limited to {limits.payload_bytes} bytes",
            )
            return
        try:
            msg = p.decode(raw, self.vsn)
        except p.ProtocolError as exc:
            self.send_error_reply(None, None, "phoenix", exc.code, exc.message)
            return
        if msg.topic == "phoenix" and msg.event == "heartbeat":
            self.send(p.heartbeat_reply(msg.ref))
            return
        if not self.messages.allow():
            self.gateway.hub.metrics.not_delivered.labels("rate_limited").inc()
            self.refuse(
                msg,
                "MessagePerSecondRateLimitReached",
                f"at most {limits.messages_per_second} messages per second",
            )
            return
        try:
            await self.dispatch(msg)
        except Exception:  # one bad message must not kill the socket or pass silently
            log.exception("websocket_message_failed", topic=msg.topic, push_event=msg.event)
            self.gateway.hub.metrics.reader_errors.inc()
            self.refuse(msg, "InternalError", "the server failed to handle this message; try again")

    async def dispatch(self, msg: p.Message) -> None:
        if msg.event == "phx_join":
            await self.join(msg)
            return
        channel = self.channels.get(msg.topic)
        if channel is None:
            self.send(p.reply_error(msg.topic, msg.ref, msg.join_ref, "unmatched topic"))
            return
        if msg.event == "phx_leave":
            self.send(p.reply_ok(msg.topic, msg.ref, msg.join_ref, {}))
            await self.leave(channel, close=True)
        elif msg.event == "access_token":
            await self.refresh_token(channel, msg)
        elif msg.event == "broadcast":
            await self.broadcast(channel, msg)
        elif msg.event == "presence":
            await self.presence(channel, msg)
        else:
            self.send(
                p.reply_error(
                    msg.topic,
                    msg.ref,
                    msg.join_ref,
                    f"UnknownEvent: {msg.event!r} is not a channel event",
                )
            )

    def send_error_reply(
        self, ref: str | None, join_ref: str | None, topic: str, code: str, message: str
    ) -> None:
        self.send(p.reply_error(topic, ref, join_ref, f"{code}: {message}"))

    def refuse(self, msg: p.Message, code: str, message: str) -> None:
        """An error reply to ``msg``: ``"Code: message"``."""
        self.send(p.reply_error(msg.topic, msg.ref, msg.join_ref, f"{code}: {message}"))

    def principal_for(self, token: str | None) -> Principal:
        if token is None:
            return self.principal
        return self.gateway.tokens.principal(token)

    async def join(self, msg: p.Message) -> None:
        gateway = self.gateway
        hub = gateway.hub
        if not self.joins.allow():
            self.refuse(msg, "ClientJoinRateLimitReached", "Too many joins per second")
            return
        if msg.topic in self.channels:
            await self.leave(self.channels[msg.topic], close=False)
        if len(self.channels) >= gateway.limits.channels_per_connection:
            self.refuse(msg, "ChannelRateLimitReached", "Too many channels")
            return
        try:
            config = p.parse_join(
                msg.topic,
                msg.payload,
                lambda: next(self._ids),
                frozenset(hub.tables),
                table_columns=hub.router.types,
            )
            principal = self.principal_for(config.access_token)
        except p.ProtocolError as exc:
            self.refuse(msg, exc.code, exc.message)
            return
        except AppError as exc:
            self.refuse(msg, "InvalidJWTToken", exc.message)
            return
        channel = Channel(self, msg.topic, msg.join_ref, config, principal)
        bindings = tuple(
            Binding(id=b.id, table=table, event=b.event, filter=b.filter, schema=b.schema)
            for b in config.bindings
            for table in (hub.tables if b.table == p.ALL_TABLES else (b.table,))
        )
        if bindings:
            keys = await hub.keys_for(principal)
            try:
                channel.subscription = await hub.subscribe(
                    keys, bindings, channel, "websocket", config.resume_from
                )
            except ResyncRequired as exc:
                self.send_error_reply(
                    msg.ref, msg.join_ref, msg.topic, "ResyncRequired", exc.message
                )
                return
        self.channels[msg.topic] = channel
        gateway.broker.join(msg.topic, channel)
        self.send(p.reply_ok(msg.topic, msg.ref, msg.join_ref, p.join_reply_response(config)))
        if bindings:
            self.send(p.system_subscribed(msg.topic))
        await channel.open(gateway.limits.slow_consumer_seconds)
        if config.presence_enabled:
            self.send(p.presence_state(msg.topic, gateway.broker.presence_state(msg.topic)))

    async def leave(self, channel: Channel, *, close: bool) -> None:
        self.channels.pop(channel.topic, None)
        self.gateway.broker.leave(channel.topic, channel)
        if channel.subscription is not None:
            self.gateway.hub.unsubscribe(channel.subscription)
        for ref in list(channel.presence_refs):
            await self.gateway.broker.untrack(channel.topic, channel.presence_key, ref)
        if close:
            self.send(p.phx_close(channel.topic, channel.join_ref))

    async def refresh_token(self, channel: Channel, msg: p.Message) -> None:
        token = msg.payload.get("access_token")
        if token is None:
            return  # upstream ignores a null token
        try:
            principal = self.gateway.tokens.principal(str(token))
        except AppError as exc:
            await self.expire(channel, f"{exc.message}")
            return
        channel.principal = principal
        if channel.subscription is not None:
            keys = await self.gateway.hub.keys_for(principal)
            self.gateway.hub.router.rekey(channel.subscription, keys)

    async def expire(self, channel: Channel, why: str) -> None:
        self.send(p.system_error(channel.topic, "system", f"Token has expired: {why}"))
        self.gateway.hub.metrics.disconnects.labels("websocket", "token_expired").inc()
        await self.leave(channel, close=True)

    async def broadcast(self, channel: Channel, msg: p.Message) -> None:
        body = msg.payload
        event = body.get("event")
        if not isinstance(event, str):
            self.refuse(msg, "InvalidBroadcast", "a broadcast needs an 'event' name")
            return
        try:
            await self.gateway.broker.broadcast(msg.topic, event, body.get("payload"), channel)
        except PayloadTooLarge as exc:
            self.refuse(msg, "PayloadTooLarge", str(exc))
            return
        if channel.config.broadcast_ack:
            self.send(p.reply_ok(msg.topic, msg.ref, msg.join_ref, {}))

    async def presence(self, channel: Channel, msg: p.Message) -> None:
        body = msg.payload
        kind = body.get("event")
        broker = self.gateway.broker
        if kind == "track":
            meta = body.get("payload") if isinstance(body.get("payload"), dict) else {}
            for ref in list(channel.presence_refs):  # one presence per channel: replace it
                await broker.untrack(channel.topic, channel.presence_key, ref)
            channel.presence_refs = set()
            ref = f"{id(channel)}-{next(self._ids)}"
            channel.presence_refs.add(ref)
            await broker.track(channel.topic, channel.presence_key, ref, meta or {})
        elif kind == "untrack":
            for ref in list(channel.presence_refs):
                await broker.untrack(channel.topic, channel.presence_key, ref)
            channel.presence_refs = set()
        else:
            self.refuse(msg, "InvalidPresence", "presence events are 'track' and 'untrack'")
            return
        self.send(p.reply_ok(msg.topic, msg.ref, msg.join_ref, {}))

    async def watchdog(self) -> None:
        """Expire channels whose token ran out; drop sockets silent for too long."""
        while self.closing is None:
            await asyncio.sleep(1.0)
            now = time.time()
            for channel in list(self.channels.values()):
                expires = channel.expires_at
                if expires is not None and now >= expires:
                    await self.expire(channel, "sign in again and send a new access_token")
            if time.monotonic() - self.last_seen > self.gateway.limits.heartbeat_timeout:
                self.close("heartbeat_timeout")

    async def shutdown(self) -> None:
        for channel in list(self.channels.values()):
            self.send(p.system_error(channel.topic, "system", "ServerShutdown: reconnect"))
        self.close("shutdown")


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
    metrics = gateway.hub.metrics
    vsn = _vsn(ws)
    if vsn not in p.VSNS:
        await _refuse(ws, 400, f"UnsupportedVsn: use {p.VSN_1} or {p.VSN_2}")
        return
    apikey = ws.headers.get("x-api-key") or ws.query_params.get("apikey")
    if not apikey:
        await _refuse(ws, 401, "apikey is required (query ?apikey= or header x-api-key)")
        return
    try:
        principal = gateway.tokens.principal(apikey)
    except AppError as exc:
        await _refuse(ws, 401, exc.message)
        return
    if len(gateway.connections) >= gateway.limits.connections:
        metrics.disconnects.labels("websocket", "too_many_connections").inc()
        await _refuse(ws, 429, "ConnectionRateLimitReached: Too many connections")
        return
    await ws.accept()
    conn = Connection(ws, gateway, vsn, principal)
    gateway.connections.add(conn)
    writer = asyncio.create_task(conn.writer(), name="ws-writer")
    watchdog = asyncio.create_task(conn.watchdog(), name="ws-watchdog")
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
            await conn.handle(raw)
        if conn.closing is not None:
            reason = conn.closing
    except WebSocketDisconnect:
        pass
    finally:
        gateway.connections.discard(conn)
        for channel in list(conn.channels.values()):
            with contextlib.suppress(Exception):
                await conn.leave(channel, close=False)
        conn.close(reason)
        watchdog.cancel()
        if not writer.done():
            writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer
        metrics.disconnects.labels("websocket", reason).inc()
        if ws.client_state == WebSocketState.CONNECTED:
            code = {"slow_consumer": SLOW_CONSUMER, "shutdown": 1012}.get(reason, 1000)
            with contextlib.suppress(Exception):
                await ws.close(code=code, reason=reason)


@router.websocket("/realtime/v1/websocket")
async def hosted_path(ws: WebSocket) -> None:
    await serve_socket(ws)


@router.websocket("/socket/websocket")
async def upstream_path(ws: WebSocket) -> None:
    await serve_socket(ws)
