"""Joining a channel and leaving it: the path from ``phx_join`` to live row events.

A join is refused, with a stable code, past the connection's join rate or channel count,
for a config or token that does not parse, and on a staff topic for anyone but a mechanic
or an admin. Otherwise its ``postgres_changes`` bindings are subscribed with the hub,
which registers the subscription in the router before it returns (``ResyncRequired``
when a resume's cursor is no longer kept). Then, in this order: the join reply,
"Subscribed to PostgreSQL" (true when sent: a change committed after it is delivered),
the row events held meanwhile (``Channel.open``), the presence state, and for a resume
the missed events, replayed page by page as the client reads (``Hub.catch_up``), then
what committed meanwhile, then live events. Leaving undoes each part of a join.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from autodispatch.domain.errors import AppError
from autodispatch.realtime import protocol as p
from autodispatch.realtime.gateway.access import STAFF_TOPICS, principal_for
from autodispatch.realtime.gateway.channel import Channel
from autodispatch.realtime.hub import ResyncRequired
from autodispatch.realtime.router import Binding

if TYPE_CHECKING:
    from autodispatch.realtime.gateway.contracts import ChannelLike, ConnectionLike


async def join(conn: ConnectionLike, msg: p.Message) -> None:
    gateway = conn.gateway
    hub = gateway.hub
    if not conn.joins.allow():
        conn.refuse(msg, "ClientJoinRateLimitReached", "Too many joins per second")
        return
    if msg.topic in conn.channels:
        await conn.leave(conn.channels[msg.topic], close=False)
    if len(conn.channels) >= gateway.limits.channels_per_connection:
        conn.refuse(msg, "ChannelRateLimitReached", "Too many channels")
        return
    try:
        config = p.parse_join(
            msg.topic,
            msg.payload,
            conn.next_id,
            frozenset(hub.tables),
            table_columns=hub.router.types,
        )
        principal = principal_for(conn, config.access_token)
    except p.ProtocolError as exc:
        conn.refuse(msg, exc.code, exc.message)
        return
    except AppError as exc:
        conn.refuse(msg, "InvalidJWTToken", exc.message)
        return
    if msg.topic in STAFF_TOPICS and principal.account_type not in ("mechanic", "admin"):
        conn.refuse(
            msg,
            "Unauthorized",
            f"{msg.topic} is for mechanics and admins; sign in as one to join it",
        )
        return
    channel = Channel(conn, msg.topic, msg.join_ref, config, principal)
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
            conn.send_error_reply(msg.ref, msg.join_ref, msg.topic, "ResyncRequired", exc.message)
            return
        if conn.closing is not None:  # the socket went away while we subscribed
            hub.unsubscribe(channel.subscription)
            return
    conn.channels[msg.topic] = channel
    gateway.broker.join(msg.topic, channel)
    conn.send(p.reply_ok(msg.topic, msg.ref, msg.join_ref, p.join_reply_response(config)))
    if bindings:
        conn.send(p.system_subscribed(msg.topic))
    await channel.open(gateway.limits.slow_consumer_seconds)
    if config.presence_enabled:
        conn.send(p.presence_state(msg.topic, gateway.broker.presence_state(msg.topic)))
    if channel.subscription is not None and hub.needs_catch_up(channel.subscription):
        # A resume: what was missed goes out as the client reads it, page by page
        # (never the whole backlog in memory), while this socket's other messages
        # are handled.
        conn.spawn(hub.catch_up(channel.subscription))


async def leave(conn: ConnectionLike, channel: ChannelLike, *, close: bool) -> None:
    conn.channels.pop(channel.topic, None)
    conn.gateway.broker.leave(channel.topic, channel)
    if channel.subscription is not None:
        conn.gateway.hub.unsubscribe(channel.subscription)
    for ref in list(channel.presence_refs or ()):
        await conn.gateway.broker.untrack(channel.topic, channel.presence_key, ref)
    if close:
        conn.send(p.phx_close(channel.topic, channel.join_ref))
