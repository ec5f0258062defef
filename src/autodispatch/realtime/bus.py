"""The bus between server processes, as broadcast and presence use it.

Every process publishes messages (JSON objects with a ``kind``) that every process
receives, itself excepted, in the order they were published (presence relies on it:
shared_presence.py). The bus adds the envelope: the format number, the sender's
origin id and how often it says alive, so any message is a sign of life. It refuses a
message too large to travel, before anyone gets it, and tells its receiver when it
(re)starts listening, since whatever was sent meanwhile was missed.

This module is the interface only: the presence, broadcast and liveness parts use this
and nothing else of the bus, so another transport can take the place of pg_bus.py
(PostgreSQL NOTIFY) without them changing.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Protocol

import structlog

log = structlog.get_logger("autodispatch.realtime")

# Messages of format 1 (no "v") carried presence as bare diffs, without liveness; they
# are ignored, except broadcasts, whose shape has not changed.
BUS_FORMAT = 2


class PayloadTooLarge(Exception):
    pass


class Receiver(Protocol):
    """What the bus hands on: the messages of other origins, and each time it listens."""

    def received(self, origin: str, message: dict[str, Any]) -> None: ...

    def listening_again(self) -> None: ...


class Bus(Protocol):
    origin: str  # this process, on the bus
    ready: asyncio.Event  # set while the bus listens
    # The errors that mean the bus cannot be reached just now (the caller repairs later).
    unavailable: tuple[type[Exception], ...]

    async def start(self, receiver: Receiver) -> None:
        """Start listening; ``receiver`` gets every readable message of another origin."""
        ...

    async def stop(self) -> None: ...

    async def publish(self, message: dict[str, Any]) -> None:
        """Send to every process; raise PayloadTooLarge, or one of ``unavailable``."""
        ...

    def room(self, message: dict[str, Any]) -> int:
        """How many characters more ``message`` can hold and still travel."""
        ...

    async def listening_origins(self) -> set[str]:
        """The origins of the other processes listening now; may raise ``unavailable``."""
        ...


async def try_publish(bus: Bus, message: dict[str, Any]) -> bool:
    """Publish; when the bus cannot be reached log it and return False (the caller
    repairs later)."""
    try:
        await bus.publish(message)
    except bus.unavailable as exc:
        log.warning("bus_publish_failed", kind=message["kind"], error=str(exc))
        return False
    return True


def encode(value: Any) -> str:
    """Compact JSON, as it travels on the bus (and as snapshot chunks are measured)."""
    return json.dumps(value, separators=(",", ":"))
