"""The subscriber processes of `bench realtime`, seen from the parent (``LoadGenerator``);
each process is ``subscriber.py``."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections import Counter
from collections.abc import Iterable
from multiprocessing.connection import Connection
from typing import Any

from autodispatch.bench.realtime.subscriber import (
    percentile,
    raise_fd_limit,
    subscriber_process,
)

__all__ = ["LoadGenerator", "percentile", "raise_fd_limit"]


class LoadGenerator:
    """The parent's handle on the subscriber processes; subscriber i lives in process i % n
    and connects to gateway (i // n) % g of the ``ports`` (each process holds subscribers
    of every gateway)."""

    def __init__(self, processes: int, host: str, ports: list[int], anon_key: str) -> None:
        self.url = f"ws://{host}:{{port}}/realtime/v1/websocket?apikey={anon_key}&vsn=1.0.0"
        self.ports = ports  # for subscribers opened from now on
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=subscriber_process, args=(child, host, self.url), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)
        self.open: set[int] = set()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def port_of(self, subscriber: int) -> int:
        return self.ports[(subscriber // len(self.pipes)) % len(self.ports)]

    async def _ask_all(self, commands: list[tuple[Any, ...] | None]) -> list[Any]:
        loop = asyncio.get_running_loop()

        def ask(pipe: Connection, command: tuple[Any, ...]) -> Any:
            pipe.send(command)
            return pipe.recv()

        jobs = [
            loop.run_in_executor(None, ask, pipe, command)
            for pipe, command in zip(self.pipes, commands, strict=True)
            if command is not None
        ]
        return list(await asyncio.gather(*jobs))

    def _split(self, indices: Iterable[int]) -> list[list[int]]:
        parts: list[list[int]] = [[] for _ in self.pipes]
        for i in indices:
            parts[i % len(self.pipes)].append(i)
        return parts

    async def resize(self, count: int, joins: list[str]) -> dict[str, Any]:
        """Hold subscribers 0..count-1: open the missing ones, close the others."""
        surplus = sorted(i for i in self.open if i >= count)
        if surplus:
            await self._ask_all(
                [("close", part) if part else None for part in self._split(surplus)]
            )
            self.open -= set(surplus)
        missing = [i for i in range(count) if i not in self.open]
        result: dict[str, Any] = {"opened": 0, "failed": 0, "errors": [], "seconds": 0.0}
        if missing:
            started = time.perf_counter()
            replies = await self._ask_all(
                [
                    ("open", [(i, joins[i], self.port_of(i)) for i in part]) if part else None
                    for part in self._split(missing)
                ]
            )
            for reply in replies:
                result["opened"] += reply["opened"]
                result["failed"] += reply["failed"]
                result["errors"] += reply["errors"]
            result["seconds"] = time.perf_counter() - started
            self.open |= set(missing)
        if result["failed"]:
            raise SystemExit(
                f"{result['failed']} subscribers could not join, e.g. {result['errors'][:3]}"
            )
        return result

    def forget(self) -> None:
        """After a server restart every connection is gone."""
        self.open.clear()

    async def reset(self) -> None:
        await self._ask_all([("reset",) for _ in self.pipes])

    async def collect(self) -> dict[str, Any]:
        replies = await self._ask_all([("stats",) for _ in self.pipes])
        hist: Counter[int] = Counter()
        closed: Counter[str] = Counter()
        for reply in replies:
            hist.update(reply["hist"])
            closed.update(reply["closed"])
        return {
            "received": sum(r["received"] for r in replies),
            "hist": hist,
            "max": max((r["max"] for r in replies), default=0.0),
            "closed": closed,
            "open": sum(r["open"] for r in replies),
        }

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError, EOFError):
                pipe.send(("quit",))
                if pipe.poll(5):
                    pipe.recv()
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
