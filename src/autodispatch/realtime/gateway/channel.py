"""One joined topic on one connection: where its row events, broadcasts and presence
diffs arrive, and the state its join settled (presence key, token expiry, subscription).

The router hands a channel its row events (``offer``, ``wait_offer``: the router's
``Sink``); a recipient's frame is built once per event for every recipient on the same
wire, topic, binding ids and vsn, and kept on the event (most recipients of one event
share it byte for byte). Until the join reply has gone out, frames are held in order and
released by ``open``: the reply comes first, then a resume's replay, then live events.
The broker hands it broadcasts and presence diffs (``on_broadcast``,
``on_presence_diff``: the broker's ``Member``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autodispatch.domain.principal import Principal
from autodispatch.realtime import protocol as p
from autodispatch.realtime.events import Event
from autodispatch.realtime.gateway.access import expiry
from autodispatch.realtime.router import Subscription

if TYPE_CHECKING:
    from autodispatch.realtime.gateway.contracts import ConnectionLike

# Why a channel (not its socket) is closed, as the `system` message before phx_close says.
CHANNEL_CLOSE_MESSAGES = {
    "resync_required": "ResyncRequired: the events after your cursor are no longer all kept;"
    " reload your data, then join without autodispatch_resume_from",
    "replay_failed": "ReplayFailed: the server could not read what you missed; join again"
    " with the same autodispatch_resume_from",
}


class Channel:
    """One topic joined on one connection: the router's ``Sink``, the broker's ``Member``."""

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
        conn: ConnectionLike,
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
        self.expires_at = expiry(principal)
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
