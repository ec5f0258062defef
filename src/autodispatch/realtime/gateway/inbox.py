"""A client's frames, from bytes to the handler of each message, in order.

``parse`` answers at once what needs no waiting: a frame over the payload limit, one
that does not decode, a heartbeat (which also keeps the socket alive for the gateway's
timer), and a message past the connection's rate. The rest is ``dispatch``ed to its
handler: a join or leave (``join``), a new access token (``access``), a broadcast or a
presence (``broadcast_presence``). A wire whose reader cannot wait (the native server)
hands frames to ``receive``, which queues them and handles them by one task while there
are any; the ASGI routes await ``handle_message`` themselves. A message that fails is
logged, counted and answered with ``InternalError``; the socket lives on.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog

from autodispatch.realtime import protocol as p
from autodispatch.realtime.gateway import access, broadcast_presence, join

if TYPE_CHECKING:
    from autodispatch.realtime.gateway.contracts import ConnectionLike

log = structlog.get_logger("autodispatch.realtime")


def parse(conn: ConnectionLike, raw: str | bytes) -> p.Message | None:
    """A client frame: answered here when that needs no waiting (heartbeats, refusals);
    otherwise the message for ``dispatch``."""
    conn.last_seen = time.monotonic()
    limits = conn.gateway.limits
    if len(raw) > limits.payload_bytes:
        conn.send_error_reply(
            None,
            None,
            "phoenix",
            "PayloadTooLarge",
            f"frames are limited to {limits.payload_bytes} bytes",
        )
        return None
    try:
        msg = p.decode(raw, conn.vsn)
    except p.ProtocolError as exc:
        conn.send_error_reply(None, None, "phoenix", exc.code, exc.message)
        return None
    if msg.topic == "phoenix" and msg.event == "heartbeat":
        conn.send(p.heartbeat_reply(msg.ref))
        return None
    if not conn.messages.allow():
        conn.gateway.hub.metrics.not_delivered.labels("rate_limited").inc()
        conn.refuse(
            msg,
            "MessagePerSecondRateLimitReached",
            f"at most {limits.messages_per_second} messages per second",
        )
        return None
    return msg


def receive(conn: ConnectionLike, raw: str | bytes) -> None:
    """A client frame from a wire that cannot wait (the native server): messages are
    handled in order, by one task while there are any."""
    msg = parse(conn, raw)
    if msg is None:
        return
    if conn.pending is None:
        conn.pending = [msg]
        conn.spawn(_work(conn))
    else:
        conn.pending.append(msg)


async def _work(conn: ConnectionLike) -> None:
    while conn.pending:
        msg = conn.pending.pop(0)
        if conn.closing is None:
            await handle_message(conn, msg)
    conn.pending = None


async def handle_message(conn: ConnectionLike, msg: p.Message) -> None:
    try:
        await dispatch(conn, msg)
    except Exception:  # one bad message must not kill the socket or pass silently
        log.exception("websocket_message_failed", topic=msg.topic, push_event=msg.event)
        conn.gateway.hub.metrics.reader_errors.inc()
        conn.refuse(msg, "InternalError", "the server failed to handle this message; try again")


async def dispatch(conn: ConnectionLike, msg: p.Message) -> None:
    if msg.event == "phx_join":
        await join.join(conn, msg)
        return
    channel = conn.channels.get(msg.topic)
    if channel is None:
        conn.send(p.reply_error(msg.topic, msg.ref, msg.join_ref, "unmatched topic"))
        return
    if msg.event == "phx_leave":
        conn.send(p.reply_ok(msg.topic, msg.ref, msg.join_ref, {}))
        await conn.leave(channel, close=True)
    elif msg.event == "access_token":
        await access.refresh_token(conn, channel, msg)
    elif msg.event == "broadcast":
        await broadcast_presence.broadcast(conn, channel, msg)
    elif msg.event == "presence":
        await broadcast_presence.presence(conn, channel, msg)
    else:
        conn.send(
            p.reply_error(
                msg.topic,
                msg.ref,
                msg.join_ref,
                f"UnknownEvent: {msg.event!r} is not a channel event",
            )
        )
