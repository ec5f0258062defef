"""What a client sends on a joined channel for the other clients of its topic: a
``broadcast``, or a ``presence`` track or untrack.

Both go through the broker, to this process's channels and, over NOTIFY, to the other
processes' (``broker.py``); a payload too large for a NOTIFY is refused with
``PayloadTooLarge``. A channel holds one presence at most: a new track replaces the last.
On a staff topic only mechanics are listed, under their signed-in id and name, whatever
the page claims. What comes back from the broker arrives at the channel
(``Channel.on_broadcast``, ``Channel.on_presence_diff``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autodispatch.realtime import protocol as p
from autodispatch.realtime.broker import PayloadTooLarge

if TYPE_CHECKING:
    from autodispatch.realtime.gateway.contracts import ChannelLike, ConnectionLike


async def broadcast(conn: ConnectionLike, channel: ChannelLike, msg: p.Message) -> None:
    body = msg.payload
    event = body.get("event")
    if not isinstance(event, str):
        conn.refuse(msg, "InvalidBroadcast", "a broadcast needs an 'event' name")
        return
    try:
        await conn.gateway.broker.broadcast(msg.topic, event, body.get("payload"), channel)
    except PayloadTooLarge as exc:
        conn.refuse(msg, "PayloadTooLarge", str(exc))
        return
    if channel.broadcast_ack:
        conn.send(p.reply_ok(msg.topic, msg.ref, msg.join_ref, {}))


async def presence(conn: ConnectionLike, channel: ChannelLike, msg: p.Message) -> None:
    body = msg.payload
    kind = body.get("event")
    broker = conn.gateway.broker
    if kind == "track":
        meta = body.get("payload") if isinstance(body.get("payload"), dict) else {}
        if channel.staff is not None:
            if channel.staff[0] != "mechanic":
                conn.refuse(msg, "Unauthorized", f"only mechanics are listed on {msg.topic}")
                return
            # The listing names the signed-in mechanic, whatever the page claims.
            meta = {**(meta or {}), "user_id": channel.presence_key, "name": channel.staff[1]}
        for ref in list(channel.presence_refs or ()):  # one presence per channel
            await broker.untrack(channel.topic, channel.presence_key, ref)
        ref = conn.gateway.unique_id()
        channel.presence_refs = {ref}
        try:
            await broker.track(channel.topic, channel.presence_key, ref, meta or {})
        except PayloadTooLarge as exc:
            channel.presence_refs = None
            conn.refuse(msg, "PayloadTooLarge", str(exc))
            return
        if conn.channels.get(channel.topic) is not channel:
            # Left (or expired) while the track was on its way: nobody would untrack it.
            await broker.untrack(channel.topic, channel.presence_key, ref)
    elif kind == "untrack":
        for ref in list(channel.presence_refs or ()):
            await broker.untrack(channel.topic, channel.presence_key, ref)
        channel.presence_refs = None
    else:
        conn.refuse(msg, "InvalidPresence", "presence events are 'track' and 'untrack'")
        return
    conn.send(p.reply_ok(msg.topic, msg.ref, msg.join_ref, {}))
