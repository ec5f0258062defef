"""Who may open a socket and join a channel, and until when: the tokens of the gateway.

A socket opens with an apikey (``admit``, the same for the native server and the ASGI
routes). A join may name its own ``access_token`` (``principal_for``); a channel then
lasts until that token's ``exp`` (``expiry``), which the client extends by sending a
new ``access_token`` (``refresh_token``). A channel whose token ran out, whose new token
does not verify, or whose new token is another user's is told so and left (``expire``):
what a channel may see follows its user's keys in the log, so another user needs a new
join, with a history of its own. The gateway's timer finds the expired channels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from autodispatch.domain.errors import AppError
from autodispatch.domain.principal import Principal
from autodispatch.realtime import protocol as p

if TYPE_CHECKING:
    from autodispatch.realtime.gateway.contracts import ChannelLike, ConnectionLike, GatewayLike

EXPIRED = "sign in again and send a new access_token"
# Topics only mechanics and admins may join; presence there is listed under the signed-in
# user's id and name (the admin page's "mechanics online"), never under what a client says.
STAFF_TOPICS = frozenset({"realtime:mechanics-online"})


class Refusal(NamedTuple):
    """Why a socket may not open: the HTTP status of the refused upgrade, and a message."""

    status: int
    message: str


def admit(gateway: GatewayLike, vsn: str, apikey: str | None) -> Principal | Refusal:
    """Whom a new socket speaks for (its apikey's principal), or why it may not open."""
    if vsn not in p.VSNS:
        return Refusal(400, f"UnsupportedVsn: use {p.VSN_1} or {p.VSN_2}")
    if not apikey:
        return Refusal(401, "apikey is required (query ?apikey= or header x-api-key)")
    try:
        principal = gateway.tokens.principal(apikey)
    except AppError as exc:
        return Refusal(401, exc.message)
    if gateway.full():
        gateway.hub.metrics.disconnects.labels("websocket", "too_many_connections").inc()
        return Refusal(429, "ConnectionRateLimitReached: Too many connections")
    return principal


def principal_for(conn: ConnectionLike, token: str | None) -> Principal:
    """Whom a join speaks for: its own access_token's principal, or the socket's."""
    if token is None:
        return conn.principal
    return conn.gateway.tokens.principal(token)


def user_id(principal: Principal) -> str | None:
    return str(principal.user_id) if principal.user_id is not None else None


def expiry(principal: Principal) -> float | None:
    exp = principal.claims.get("exp")
    return float(exp) if exp is not None else None


async def refresh_token(conn: ConnectionLike, channel: ChannelLike, msg: p.Message) -> None:
    token = msg.payload.get("access_token")
    if token is None:
        return  # upstream ignores a null token
    try:
        principal = conn.gateway.tokens.principal(str(token))
    except AppError as exc:
        await expire(conn, channel, f"{exc.message}")
        return
    sub = channel.subscription
    if sub is not None and sub.user_id != user_id(principal):
        # What a channel may see follows its user's keys in the log (a change of them
        # is an event, applied in its place); another user's token would need a new
        # history: the client joins again with it.
        await expire(conn, channel, "this access_token is for another user; join again with it")
        return
    channel.expires_at = expiry(principal)


async def expire(conn: ConnectionLike, channel: ChannelLike, why: str) -> None:
    if conn.channels.get(channel.topic) is not channel:
        return  # left meanwhile (the timer and a refresh may both expire it)
    conn.send(p.system_error(channel.topic, "system", f"Token has expired: {why}"))
    conn.gateway.hub.metrics.disconnects.labels("websocket", "token_expired").inc()
    await conn.leave(channel, close=True)
