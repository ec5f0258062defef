"""What the gateway's job modules ask of a connection, of the process's gateway and of a
joined channel: ``ConnectionLike``, ``GatewayLike``, ``ChannelLike``.

The job modules (``access``, ``inbox``, ``join``, ``broadcast_presence``, ``channel``,
``process``) type against these, not against ``Connection``, ``Gateway`` and ``Channel``,
so no module imports one that imports it back (type-only imports included): a class is
imported only where it is built or composed (``join`` builds a ``Channel``,
``connection`` is given its ``Gateway``) and by the package's ``__init__``. This module
imports nothing of the package but its two leaves, ``limits`` and ``wire``, and those for
types only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from autodispatch.domain.principal import Principal
    from autodispatch.identity.tokens import TokenIssuer
    from autodispatch.realtime import protocol as p
    from autodispatch.realtime.broker import Broker
    from autodispatch.realtime.gateway.limits import Limits, TokenBucket
    from autodispatch.realtime.gateway.wire import Wire
    from autodispatch.realtime.hub import Hub
    from autodispatch.realtime.router import Subscription


class GatewayLike(Protocol):
    """The process's ``Gateway``, as a connection's jobs see it."""

    hub: Hub
    broker: Broker
    tokens: TokenIssuer
    limits: Limits

    def unique_id(self) -> str: ...

    def full(self) -> bool: ...


class ChannelLike(Protocol):
    """A joined ``Channel``, as its connection's jobs see it (and the broker's ``Member``)."""

    topic: str
    join_ref: str | None
    broadcast_ack: bool
    presence_key: str
    presence_refs: set[str] | None
    staff: tuple[str | None, str | None] | None
    expires_at: float | None
    subscription: Subscription | None

    def on_broadcast(self, event: str, payload: Any, sender: object | None) -> None: ...

    def on_presence_diff(self, joins: dict[str, Any], leaves: dict[str, Any]) -> None: ...


class ConnectionLike(Protocol):
    """A ``Connection``, as its jobs, its channels and the gateway's timer see it."""

    channels: dict[str, ChannelLike]
    pending: list[p.Message] | None
    closing: str | None
    last_seen: float
    vsn: str
    principal: Principal
    wire: Wire
    joins: TokenBucket
    messages: TokenBucket

    @property
    def gateway(self) -> GatewayLike: ...

    def next_id(self) -> int: ...

    def send(self, msg: p.Message) -> bool: ...

    def send_error_reply(
        self, ref: str | None, join_ref: str | None, topic: str, code: str, message: str
    ) -> None: ...

    def refuse(self, msg: p.Message, code: str, message: str) -> None: ...

    def close(self, reason: str) -> None: ...

    async def shutdown(self) -> None: ...

    def spawn(self, work: Any) -> None: ...

    async def leave(self, channel: ChannelLike, *, close: bool) -> None: ...

    async def expire(self, channel: ChannelLike, why: str) -> None: ...
