"""The Supabase Realtime protocol on one socket: a ``Connection`` and its ``Channel``s.

Transport-agnostic. A connection reads client messages (``parse``, then ``dispatch``) and
writes server frames through its ``Wire``, which is either the native WebSocket server
(``wsserver.py``: each frame written straight to the socket) or any ASGI server
(``websocket.py``: a bounded queue drained by a writer task). One ``Gateway`` per process
holds the connections, and one timer for all of them expires tokens and drops sockets
that went silent (no task per connection).

Row events come from the hub's router through ``Channel.offer``: a recipient's frame is
built once per event for every recipient on the same wire, topic, binding ids and vsn
(most recipients of one event share it byte for byte). The join reply goes out before
any row event, and "Subscribed to PostgreSQL" only once the subscription is registered,
so it is true when sent: a change committed after it is delivered. A resume's missed
events follow it, replayed page by page as the client reads (``Hub.catch_up``), then
what committed meanwhile, then live events.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import sys
import time
from typing import Any, Protocol

import structlog

from autodispatch.domain.errors import AppError
from autodispatch.domain.principal import Principal
from autodispatch.identity.tokens import TokenIssuer
from autodispatch.realtime import protocol as p
from autodispatch.realtime.broker import Broker, PayloadTooLarge
from autodispatch.realtime.events import Event
from autodispatch.realtime.hub import Hub, ResyncRequired
from autodispatch.realtime.router import Binding, Subscription

log = structlog.get_logger("autodispatch.realtime")

SLOW_CONSUMER = 4000  # close code of a client that fell too far behind (private range)
CLOSE_CODES = {"slow_consumer": SLOW_CONSUMER, "shutdown": 1012, "invalid_utf8": 1007}
# Control frames (replies, heartbeats, presence, broadcasts) may go past a queue that row
# events filled by this many: a resume waiting for room (it keeps the queue full while the
# client reads) must not turn the client's heartbeat reply into a slow-consumer close.
CONTROL_ROOM = 64
SWEEP_SECONDS = 1.0
EXPIRED = "sign in again and send a new access_token"
# Topics only mechanics and admins may join; presence there is listed under the signed-in
# user's id and name (the admin page's "mechanics online"), never under what a client says.
STAFF_TOPICS = frozenset({"realtime:mechanics-online"})
# Why a channel (not its socket) is closed, as the `system` message before phx_close says.
CHANNEL_CLOSE_MESSAGES = {
    "resync_required": "ResyncRequired: the events after your cursor are no longer all kept;"
    " reload your data, then join without autodispatch_resume_from",
    "replay_failed": "ReplayFailed: the server could not read what you missed; join again"
    " with the same autodispatch_resume_from",
}


class Limits:
    """Per-process and per-connection limits; each refusal has a stable code."""

    def __init__(
        self,
        *,
        connections: int = 10_000,
        channels_per_connection: int = 100,
        joins_per_second: int = 50,
        messages_per_second: int = 500,
        payload_bytes: int = 256 * 1024,
        queue_size: int = 1000,
        heartbeat_timeout: float = 60.0,
        slow_consumer_seconds: float = 2.0,
    ) -> None:
        self.connections = connections
        self.channels_per_connection = channels_per_connection
        self.joins_per_second = joins_per_second
        self.messages_per_second = messages_per_second
        self.payload_bytes = payload_bytes
        self.queue_size = queue_size  # frames waiting for a client, beyond the socket's buffer
        self.heartbeat_timeout = heartbeat_timeout
        # A client whose queue stays full this long is a slow consumer and is closed.
        self.slow_consumer_seconds = slow_consumer_seconds


class TokenBucket:
    """At most ``rate`` at once, refilled at ``rate`` per second (two floats a connection)."""

    __slots__ = ("rate", "stamp", "tokens")

    def __init__(self, rate: int) -> None:
        self.rate = float(rate)
        self.tokens = float(rate)
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Wire(Protocol):
    """Where a connection's frames go. ``kind`` names what a prepared frame is (frames
    are shared between the connections of one kind)."""

    kind: str

    def prepare(self, frame: str | bytes) -> Any:
        """A text (str) or binary (bytes) frame as this wire writes it."""
        ...

    def write(self, frame: Any, event: Event | None) -> bool:
        """Write or queue a prepared frame now; False (and nothing else) when full or closed."""
        ...

    async def write_wait(self, frame: Any, event: Event | None, timeout: float) -> bool:
        """Write a prepared frame, waiting up to ``timeout`` for room; False if none came."""
        ...

    def close(self, reason: str) -> None:
        """Send nothing more but what must precede the close, then close saying why."""
        ...


class Gathering(Protocol):
    """A wire holding frames gathered during a batch (``WriteBatch``)."""

    def write_gathered(self) -> None: ...


class WriteBatch:
    """While the reader routes a batch of events, wires that can (the native server)
    gather each connection's frames and write them with one call at ``end``: one system
    call per recipient of the batch instead of one per frame."""

    __slots__ = ("active", "gathering")

    def __init__(self) -> None:
        self.active = False
        self.gathering: list[Gathering] = []

    def begin(self) -> None:
        self.active = True

    def end(self) -> None:
        self.active = False
        gathering, self.gathering = self.gathering, []
        for wire in gathering:
            wire.write_gathered()


class Gateway:
    """State shared by this process's sockets, and the one timer that watches them all."""

    def __init__(self, hub: Hub, broker: Broker, tokens: TokenIssuer, limits: Limits) -> None:
        self.hub = hub
        self.broker = broker
        self.tokens = tokens
        self.limits = limits
        self.connections: set[Connection] = set()
        self.batch = WriteBatch()
        hub.router.batching.append(self.batch)
        self._sweeper: asyncio.Task[None] | None = None
        # Presence from every process meets in one presence_state, where clients tell
        # entries apart by key and phx_ref: object ids and counters repeat between
        # processes, 48 random bits per gateway practically never do.
        self._id_prefix = secrets.token_urlsafe(6)
        self._ids = itertools.count(1)

    def unique_id(self) -> str:
        """A short string (a default presence key, a phx_ref), unique in practice across
        every gateway, in this process and in others."""
        return f"{self._id_prefix}{next(self._ids):x}"

    def add(self, conn: Connection) -> None:
        self.connections.add(conn)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep(), name="realtime-sweeper"
            )

    def discard(self, conn: Connection) -> None:
        self.connections.discard(conn)

    def full(self) -> bool:
        return len(self.connections) >= self.limits.connections

    def announce_shutdown(self) -> None:
        """Tell every channel the server is going away (uvicorn then closes with 1012);
        clients reconnect, to this server or another, and resume from their cursor."""
        for conn in list(self.connections):
            for channel in list(conn.channels.values()):
                conn.send(p.system_error(channel.topic, "system", "ServerShutdown: reconnect"))

    async def _sweep(self) -> None:
        """Once a second: expire channels whose token ran out, close silent sockets."""
        while self.connections:
            await asyncio.sleep(SWEEP_SECONDS)
            now, silent_since = time.time(), time.monotonic() - self.limits.heartbeat_timeout
            for conn in list(self.connections):
                if conn.closing is not None:
                    continue
                if conn.last_seen < silent_since:
                    conn.close("heartbeat_timeout")
                    continue
                for channel in list(conn.channels.values()):
                    if channel.expires_at is not None and now >= channel.expires_at:
                        conn.spawn(conn.expire(channel, EXPIRED))


class Channel:
    __slots__ = (
        "_held",
        "broadcast_ack",
        "broadcast_self",
        "conn",
        "expires_at",
        "join_ref",
        "presence_enabled",
        "presence_key",
        "presence_refs",
        "staff",
        "subscription",
        "topic",
    )

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
        self.broadcast_self = config.broadcast_self
        self.broadcast_ack = config.broadcast_ack
        self.presence_enabled = config.presence_enabled
        self.presence_key = config.presence_key or conn.gateway.unique_id()
        self.presence_refs: set[str] | None = None
        # On a staff topic: (account type, display name) of the signed-in user.
        self.staff: tuple[str | None, str | None] | None = None
        self.expires_at = _expiry(principal)
        self.subscription: Subscription | None = None
        # Row-event frames held until the join reply has gone out (then None).
        self._held: list[tuple[Event, Any]] | None = []

    # -- row events (the router calls offer, and wait_offer when the queue was full) ----
    def _frame(self, event: Event, ids: tuple[int, ...], data_json: str) -> Any:
        conn = self.conn
        key = (conn.wire.kind, self.topic, ids, conn.vsn, data_json)
        frame = event.frames.get(key)
        if frame is None:
            text = p.postgres_changes_frame(self.topic, ids, data_json, conn.vsn)
            frame = event.frames[key] = conn.wire.prepare(text)
        return frame

    def offer(self, event: Event, ids: tuple[int, ...], data_json: str) -> bool:
        frame = self._frame(event, ids, data_json)
        if self._held is not None:
            self._held.append((event, frame))
            return True
        return self.conn.wire.write(frame, event)

    async def wait_offer(
        self, event: Event, ids: tuple[int, ...], data_json: str, timeout: float
    ) -> bool:
        if self.conn.channels.get(self.topic) is not self and self._held is None:
            return False  # left, expired or replaced: a replay still running writes nothing
        frame = self._frame(event, ids, data_json)
        if self._held is not None:
            self._held.append((event, frame))
            return True
        return await self.conn.wire.write_wait(frame, event, timeout)

    def close(self, reason: str) -> None:
        """The router or the hub gives up on this channel's subscription. A slow consumer
        closes the socket (its cursor is exact; it resumes); a channel whose history is
        gone, or whose replay failed, is told so and closed alone (the client rejoins:
        with its cursor after a failed replay, afresh after ``ResyncRequired``)."""
        message = CHANNEL_CLOSE_MESSAGES.get(reason)
        if message is None:
            self.conn.close(reason)
            return
        conn = self.conn
        if conn.channels.get(self.topic) is self and conn.closing is None:
            conn.send(p.system_error(self.topic, "postgres_changes", message))
            conn.spawn(conn.leave(self, close=True))

    async def open(self, timeout: float) -> None:
        """After the join reply: release the frames held meanwhile (a resume's replay, and
        live events that arrived during it), in order, waiting for room in the queue; then
        go live. Frames offered while this waits are held too, so order is kept."""
        held = self._held or []
        while held:
            event, frame = held.pop(0)
            if not await self.conn.wire.write_wait(frame, event, timeout):
                self.conn.close("slow_consumer")
                return
        self._held = None

    # -- broadcast and presence (the broker calls these) --------------------------------
    def on_broadcast(self, event: str, payload: Any, sender: object | None) -> None:
        if sender is self and not self.broadcast_self:
            return
        self.conn.send(p.broadcast(self.topic, event, payload))

    def on_presence_diff(self, joins: dict[str, Any], leaves: dict[str, Any]) -> None:
        if self.presence_enabled:
            self.conn.send(p.presence_diff(self.topic, joins, leaves))


def _user_id(principal: Principal) -> str | None:
    return str(principal.user_id) if principal.user_id is not None else None


def _expiry(principal: Principal) -> float | None:
    exp = principal.claims.get("exp")
    return float(exp) if exp is not None else None


class Connection:
    """One socket speaking the protocol; its frames go through ``wire``."""

    __slots__ = (
        "_inbox",
        "_next_id",
        "_tasks",
        "channels",
        "closing",
        "gateway",
        "joins",
        "last_seen",
        "messages",
        "principal",
        "vsn",
        "wire",
    )

    def __init__(self, gateway: Gateway, vsn: str, principal: Principal, wire: Wire) -> None:
        self.gateway = gateway
        self.vsn = vsn
        self.principal = principal  # from the socket's apikey
        self.wire = wire
        self.channels: dict[str, Channel] = {}
        self.closing: str | None = None
        self.last_seen = time.monotonic()
        self.joins = TokenBucket(gateway.limits.joins_per_second)
        self.messages = TokenBucket(gateway.limits.messages_per_second)
        self._next_id = 0
        self._inbox: list[p.Message] | None = None  # messages waiting for _work
        self._tasks: set[asyncio.Task[None]] | None = None

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # -- sending ------------------------------------------------------------------------
    def send(self, msg: p.Message) -> bool:
        """Queue a server message; a full queue closes the connection (it cannot keep up)."""
        try:
            frame = p.encode(msg, self.vsn)
        except p.ProtocolError as exc:
            log.warning("unencodable_message", error=str(exc))
            return False
        if self.closing is not None:
            return False
        if self.wire.write(self.wire.prepare(frame), None):
            return True
        self.close("slow_consumer")
        return False

    def close(self, reason: str) -> None:
        """Close the socket saying why (a slow consumer gets nothing more: its cursor is
        the last event it received); the transport then calls ``finish``."""
        if self.closing is None:
            self.closing = reason
            self.wire.close(reason)
            self._detach()

    def lost(self) -> None:
        """The socket is gone (the client closed it, or the network): stop routing to it
        now, clean up in a task."""
        if self.closing is None:
            self.closing = "client_closed"
        self._detach()
        self.spawn(self.finish(self.closing))

    def _detach(self) -> None:
        """No more events or broadcasts for this socket's channels (``finish`` leaves them)."""
        hub, broker = self.gateway.hub, self.gateway.broker
        for channel in self.channels.values():
            broker.leave(channel.topic, channel)
            if channel.subscription is not None:
                hub.unsubscribe(channel.subscription)

    def spawn(self, work: Any) -> None:
        """Run a coroutine for this connection, kept until it is done."""
        if self._tasks is None:
            self._tasks = set()
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._tasks is not None:
            self._tasks.discard(task)
            if not self._tasks:
                self._tasks = None  # an idle connection keeps no set

    async def finish(self, reason: str) -> None:
        """The socket is gone: leave every channel, count the disconnect."""
        self.gateway.discard(self)
        self.closing = self.closing or reason
        for channel in list(self.channels.values()):
            with contextlib.suppress(Exception):
                await self.leave(channel, close=False)
        self.gateway.hub.metrics.disconnects.labels("websocket", self.closing).inc()
        if self._tasks:
            for task in list(self._tasks):
                if task is not asyncio.current_task():
                    task.cancel()

    async def shutdown(self) -> None:
        for channel in list(self.channels.values()):
            self.send(p.system_error(channel.topic, "system", "ServerShutdown: reconnect"))
        self.close("shutdown")

    # -- receiving ------------------------------------------------------------------------
    def parse(self, raw: str | bytes) -> p.Message | None:
        """A client frame: answered here when that needs no waiting (heartbeats, refusals);
        otherwise the message for ``dispatch``."""
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
            return None
        try:
            msg = p.decode(raw, self.vsn)
        except p.ProtocolError as exc:
            self.send_error_reply(None, None, "phoenix", exc.code, exc.message)
            return None
        if msg.topic == "phoenix" and msg.event == "heartbeat":
            self.send(p.heartbeat_reply(msg.ref))
            return None
        if not self.messages.allow():
            self.gateway.hub.metrics.not_delivered.labels("rate_limited").inc()
            self.refuse(
                msg,
                "MessagePerSecondRateLimitReached",
                f"at most {limits.messages_per_second} messages per second",
            )
            return None
        return msg

    def receive(self, raw: str | bytes) -> None:
        """A client frame from a wire that cannot wait (the native server): messages are
        handled in order, by one task while there are any."""
        msg = self.parse(raw)
        if msg is None:
            return
        if self._inbox is None:
            self._inbox = [msg]
            self.spawn(self._work())
        else:
            self._inbox.append(msg)

    async def _work(self) -> None:
        while self._inbox:
            msg = self._inbox.pop(0)
            if self.closing is None:
                await self.handle_message(msg)
        self._inbox = None

    async def handle_message(self, msg: p.Message) -> None:
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
                self.next_id,
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
        if msg.topic in STAFF_TOPICS and principal.account_type not in ("mechanic", "admin"):
            self.refuse(
                msg,
                "Unauthorized",
                f"{msg.topic} is for mechanics and admins; sign in as one to join it",
            )
            return
        channel = Channel(self, msg.topic, msg.join_ref, config, principal)
        if msg.topic in STAFF_TOPICS:
            # Who is online is the server's to say: listed under the user's id.
            channel.presence_key = str(principal.user_id)
            name = principal.claims.get("user_metadata", {}).get("name")
            channel.staff = (principal.account_type, name)
        # Interned: every subscription keeps these few strings (and the router's index
        # looks tables up by them), so one copy each for the whole process.
        bindings = tuple(
            Binding(
                id=b.id,
                table=sys.intern(table),
                event=sys.intern(b.event),
                filter=b.filter,
                schema=sys.intern(b.schema),
            )
            for b in config.bindings
            for table in (hub.tables if b.table == p.ALL_TABLES else (b.table,))
        )
        if bindings:
            try:
                channel.subscription = await hub.subscribe(
                    principal, bindings, channel, "websocket", config.resume_from
                )
            except ResyncRequired as exc:
                self.send_error_reply(
                    msg.ref, msg.join_ref, msg.topic, "ResyncRequired", exc.message
                )
                return
            if self.closing is not None:  # the socket went away while we subscribed
                hub.unsubscribe(channel.subscription)
                return
        self.channels[msg.topic] = channel
        gateway.broker.join(msg.topic, channel)
        self.send(p.reply_ok(msg.topic, msg.ref, msg.join_ref, p.join_reply_response(config)))
        if bindings:
            self.send(p.system_subscribed(msg.topic))
        await channel.open(gateway.limits.slow_consumer_seconds)
        if config.presence_enabled:
            self.send(p.presence_state(msg.topic, gateway.broker.presence_state(msg.topic)))
        if channel.subscription is not None and hub.needs_catch_up(channel.subscription):
            # A resume: what was missed goes out as the client reads it, page by page
            # (never the whole backlog in memory), while this socket's other messages
            # are handled.
            self.spawn(hub.catch_up(channel.subscription))

    async def leave(self, channel: Channel, *, close: bool) -> None:
        self.channels.pop(channel.topic, None)
        self.gateway.broker.leave(channel.topic, channel)
        if channel.subscription is not None:
            self.gateway.hub.unsubscribe(channel.subscription)
        for ref in list(channel.presence_refs or ()):
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
        sub = channel.subscription
        if sub is not None and sub.user_id != _user_id(principal):
            # What a channel may see follows its user's keys in the log (a change of them
            # is an event, applied in its place); another user's token would need a new
            # history: the client joins again with it.
            await self.expire(channel, "this access_token is for another user; join again with it")
            return
        channel.expires_at = _expiry(principal)

    async def expire(self, channel: Channel, why: str) -> None:
        if self.channels.get(channel.topic) is not channel:
            return  # left meanwhile (the timer and a refresh may both expire it)
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
        if channel.broadcast_ack:
            self.send(p.reply_ok(msg.topic, msg.ref, msg.join_ref, {}))

    async def presence(self, channel: Channel, msg: p.Message) -> None:
        body = msg.payload
        kind = body.get("event")
        broker = self.gateway.broker
        if kind == "track":
            meta = body.get("payload") if isinstance(body.get("payload"), dict) else {}
            if channel.staff is not None:
                if channel.staff[0] != "mechanic":
                    self.refuse(msg, "Unauthorized", f"only mechanics are listed on {msg.topic}")
                    return
                # The listing names the signed-in mechanic, whatever the page claims.
                meta = {**(meta or {}), "user_id": channel.presence_key, "name": channel.staff[1]}
            for ref in list(channel.presence_refs or ()):  # one presence per channel
                await broker.untrack(channel.topic, channel.presence_key, ref)
            ref = self.gateway.unique_id()
            channel.presence_refs = {ref}
            try:
                await broker.track(channel.topic, channel.presence_key, ref, meta or {})
            except PayloadTooLarge as exc:
                channel.presence_refs = None
                self.refuse(msg, "PayloadTooLarge", str(exc))
                return
            if self.channels.get(channel.topic) is not channel:
                # Left (or expired) while the track was on its way: nobody would untrack it.
                await broker.untrack(channel.topic, channel.presence_key, ref)
        elif kind == "untrack":
            for ref in list(channel.presence_refs or ()):
                await broker.untrack(channel.topic, channel.presence_key, ref)
            channel.presence_refs = None
        else:
            self.refuse(msg, "InvalidPresence", "presence events are 'track' and 'untrack'")
            return
        self.send(p.reply_ok(msg.topic, msg.ref, msg.join_ref, {}))
