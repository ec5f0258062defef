"""How much one process and one connection may do: the limits, and the token bucket
that meters a connection's joins and messages.

Each refusal the gateway sends for a limit has a stable code (``ChannelRateLimitReached``,
``MessagePerSecondRateLimitReached``, ...); the limits themselves are plain numbers here,
set once by the app and read by every connection.
"""

from __future__ import annotations

import time


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
