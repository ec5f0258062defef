"""A bounded queue of frames for one connection (the SSE transport's sink), and the loop
that writes them: the overflow policy is to close a client that stays too slow, which then
resumes from its cursor and loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from autodispatch.realtime.events import Event


class QueueSink:
    """A bounded queue of frames for one connection. When it stays full longer than the
    reader will wait, the client is too slow: the sink closes (reason ``slow_consumer``)
    and the client resumes from its cursor."""

    def __init__(self, maxsize: int, render: Callable[[Event, tuple[int, ...], str], Any]) -> None:
        self.queue: asyncio.Queue[tuple[Event | None, Any]] = asyncio.Queue(maxsize)
        self.render = render
        self.closed_reason: str | None = None

    def offer(self, event: Event, ids: tuple[int, ...], data_json: str) -> bool:
        """Queue without waiting; False when full (the reader then waits, see log.py)."""
        if self.closed_reason is not None:
            return False
        try:
            self.queue.put_nowait((event, self.render(event, ids, data_json)))
        except asyncio.QueueFull:
            return False
        return True

    async def wait_offer(
        self, event: Event, ids: tuple[int, ...], data_json: str, timeout: float
    ) -> bool:
        if self.closed_reason is not None:
            return False
        try:
            await asyncio.wait_for(
                self.queue.put((event, self.render(event, ids, data_json))), timeout
            )
        except TimeoutError:
            return False
        return self.closed_reason is None

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            # Wake the writer even when the queue is full.
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait((None, None))
