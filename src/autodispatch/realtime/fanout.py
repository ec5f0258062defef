"""The channels joined to each topic in this process, and what is handed to them.

A broadcast goes on the bus first, so one too large to travel is refused before anyone
gets it, then to this process's members; a broadcast from another process comes from
the bus to ours. Presence diffs, from shared_presence.py, go to the same members.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Protocol

from autodispatch.realtime.bus import Bus


class Member(Protocol):
    """A joined channel, as the broker sees it."""

    def on_broadcast(self, event: str, payload: Any, sender: object | None) -> None: ...

    def on_presence_diff(self, joins: dict[str, Any], leaves: dict[str, Any]) -> None: ...


class Fanout:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.members: dict[str, set[Member]] = defaultdict(set)

    def join(self, topic: str, member: Member) -> None:
        self.members[topic].add(member)

    def leave(self, topic: str, member: Member) -> None:
        self.members[topic].discard(member)
        if not self.members[topic]:
            del self.members[topic]

    async def broadcast(self, topic: str, event: str, payload: Any, sender: object) -> None:
        """Deliver to other processes through the bus and to this process's members.

        Published first: a message too large for the bus is refused before anyone gets it.
        """
        await self.bus.publish(
            {"kind": "broadcast", "topic": topic, "event": event, "payload": payload}
        )
        self._deliver(topic, event, payload, sender)

    def received(self, message: dict[str, Any]) -> None:
        """A broadcast from another process (in any format: its shape has not changed)."""
        topic, event = message["topic"], message["event"]
        if not (isinstance(topic, str) and isinstance(event, str)):
            raise TypeError("topic and event must be strings")
        self._deliver(topic, event, message["payload"], None)

    def presence_diff(self, topic: str, joins: dict[str, Any], leaves: dict[str, Any]) -> None:
        for member in list(self.members.get(topic, ())):
            member.on_presence_diff(joins, leaves)

    def _deliver(self, topic: str, event: str, payload: Any, sender: object | None) -> None:
        for member in list(self.members.get(topic, ())):
            member.on_broadcast(event, payload, sender)
