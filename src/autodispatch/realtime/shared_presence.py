"""Presence shared between processes: the entries of every origin, kept converged.

Each process (an origin) owns the entries its own clients track; the others hold a copy
per origin, kept from the diffs it publishes. Diffs alone do not converge (a process
that starts or reconnects late missed the earlier ones; one that dies without a word
leaves its entries behind everywhere), so:

- when its listener becomes ready (at start and after every reconnect) a process asks
  everyone for their entries (``sync``) and publishes its own (``snapshot``, in chunks
  that fit a bus message, the last one marked). A complete snapshot replaces what is
  held for its origin, and the members of each topic it changes get one presence diff;
- an origin dropped by peers.py (silent, or said bye) loses its entries, with leaves;
- an origin that says alive but whose complete snapshot we do not hold (it was dropped
  while only slow, or a chunk was lost) is asked for one.

A process's snapshot (or bye) goes out alone, after the presence diffs already going
out and before any later one (``Gate``); the bus delivers messages in the order they
were published (PostgreSQL: commit order), so a snapshot is never overtaken by a diff it
does not include, nor a diff by an older snapshot. What needs no I/O (the entries,
diffs, chunks, the gate) is presence.py; the bus is reached through bus.py's interface
only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

import structlog

from autodispatch.background import cancel_tasks
from autodispatch.realtime.bus import Bus, PayloadTooLarge, encode, try_publish
from autodispatch.realtime.fanout import Fanout
from autodispatch.realtime.presence import (
    Assembly,
    Gate,
    Keys,
    Topics,
    as_metas,
    checked_keys,
    chunks,
    difference,
    merge,
)

log = structlog.get_logger("autodispatch.realtime")


def _presence_diff(topic: str, joins: Keys, leaves: Keys) -> dict[str, Any]:
    # Both joins and leaves, even when empty: processes of format 1 read both and would
    # stop listening on a message without one.
    return {"kind": "presence", "topic": topic, "joins": joins, "leaves": leaves}


class SharedPresence:
    def __init__(self, bus: Bus, fanout: Fanout) -> None:
        self.bus = bus
        self.fanout = fanout
        self.origin = bus.origin
        # origin -> topic -> presence key -> phx_ref -> meta; this process's own entries
        # are under self.origin.
        self.by_origin: dict[str, Topics] = {}
        # Origins whose complete snapshot we hold, kept up by their diffs since.
        self._synced_origins: set[str] = set()
        self._asked_at: dict[str, float] = {}  # origin -> when we last asked it alone
        self._assembling: dict[str, Assembly] = {}
        self._gate = Gate()
        self._snapshot_id = 0
        self._sync_sent_at = float("-inf")
        self._unpublished = False  # an own change did not reach the bus: snapshot again
        self._departed = False  # said bye: publish no more presence
        self._completed = asyncio.Event()  # a snapshot was completed
        self._tasks: set[asyncio.Task[None]] = set()
        self._chunk_room = bus.room(
            {"kind": "snapshot", "snapshot": 2**53, "seq": 2**31, "last": False, "entries": []}
        )

    def state(self, topic: str) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for topics in self.by_origin.values():
            for key, refs in topics.get(topic, {}).items():
                state.setdefault(key, {"metas": []})["metas"].extend(refs.values())
        return state

    async def track(self, topic: str, key: str, ref: str, meta: dict[str, Any]) -> None:
        entry = {**meta, "phx_ref": ref}
        size = len(encode([topic, key, ref, entry]))
        if size > self._chunk_room:  # it must fit in a snapshot on its own
            raise PayloadTooLarge(
                f"this presence is {size} bytes; at most {self._chunk_room} travel between servers"
            )
        joins = {key: {ref: entry}}
        async with self._gate.diff():
            if not self._departed:
                try:
                    await self.bus.publish(_presence_diff(topic, joins, {}))
                except BaseException:
                    # Cancelled or failed, the join may still have committed: the next
                    # alive republishes our snapshot, which does not hold it.
                    self._unpublished = True
                    raise
            self._change(self.origin, topic, joins, {})

    async def untrack(self, topic: str, key: str, ref: str) -> None:
        """Gone here at once; when the bus cannot be reached, the others learn it from the
        snapshot published once it can."""
        async with self._gate.diff():
            entry = self.by_origin.get(self.origin, {}).get(topic, {}).get(key, {}).get(ref)
            if entry is None:
                return
            leaves = {key: {ref: entry}}
            self._change(self.origin, topic, {}, leaves)
            if self._departed:
                return
            published = False
            try:
                published = await try_publish(self.bus, _presence_diff(topic, {}, leaves))
            finally:  # also when cancelled (a connection closing): repaired by a snapshot
                if not published:
                    self._unpublished = True

    async def depart(self) -> None:
        """Say bye (the others drop this process's entries at once); publish no more."""
        await cancel_tasks(*self._tasks)
        async with self._gate.alone():
            if not self._departed:
                self._departed = True
                await try_publish(self.bus, {"kind": "bye"})

    # -- what the bus brings ----------------------------------------------------------
    def received_diff(self, origin: str, message: dict[str, Any]) -> None:
        topic = message["topic"]
        if not isinstance(topic, str):
            raise TypeError("topic must be a string")
        joins = checked_keys(message.get("joins", {}))
        leaves = checked_keys(message.get("leaves", {}))
        self._change(origin, topic, joins, leaves)

    def received_chunk(self, origin: str, message: dict[str, Any]) -> None:
        snapshot, seq, entries = message["snapshot"], message["seq"], message["entries"]
        if not (isinstance(snapshot, int) and isinstance(seq, int) and isinstance(entries, list)):
            raise TypeError("snapshot, seq and entries must be int, int and list")
        assembly = self._assembling.get(origin)
        if seq == 0:
            assembly = self._assembling[origin] = Assembly(snapshot)
        elif assembly is None or (assembly.snapshot, assembly.next_seq) != (snapshot, seq):
            # A chunk went missing (our listener reconnected, or the origin's publishing
            # failed): this snapshot cannot be whole. The next alive asks again.
            self._assembling.pop(origin, None)
            return
        for topic, key, ref, meta in entries:
            if not (isinstance(topic, str) and isinstance(key, str) and isinstance(ref, str)):
                raise TypeError("snapshot entries are [topic, key, ref, meta]")
            if not isinstance(meta, dict):
                raise TypeError("snapshot metas must be objects")
            assembly.topics.setdefault(topic, {}).setdefault(key, {})[ref] = meta
        assembly.next_seq += 1
        if message["last"] is True:
            del self._assembling[origin]
            self._replace(origin, assembly.topics)
            self._synced_origins.add(origin)
            self._completed.set()

    def sync_asked(self, to: Any) -> None:
        """A process asked for snapshots: everyone's (``to`` is None), or one origin's."""
        if to in (None, self.origin):
            self._spawn(self._publish_snapshot())

    def alive_from(self, origin: str, interval: float) -> None:
        """``origin`` says alive; if we do not hold its complete snapshot (it was dropped
        while only slow, or its snapshot went missing), ask it for one."""
        # Its answer to our last sync may still be on its way: ask once per interval.
        now = time.monotonic()
        asked_at = self._asked_at.get(origin, float("-inf"))
        if (
            origin not in self._synced_origins
            and now >= max(self._sync_sent_at, asked_at) + interval
        ):
            self._asked_at[origin] = now
            self._spawn(self._ask_for_snapshot(origin))

    def drop(self, origin: str, reason: str) -> None:
        """``origin`` is gone (peers.py): its entries leave."""
        self._synced_origins.discard(origin)
        self._asked_at.pop(origin, None)
        self._assembling.pop(origin, None)
        held = self.by_origin.get(origin, {})
        if held:
            count = sum(len(refs) for keys in held.values() for refs in keys.values())
            log.info("presence_origin_dropped", origin=origin, reason=reason, entries=count)
        self._replace(origin, {})

    def listening_again(self) -> None:
        """The listener (re)connected: whatever was sent meanwhile was missed, so ask
        everyone for their entries and say ours."""
        self._assembling.clear()
        self._synced_origins.clear()
        self._sync_sent_at = time.monotonic()
        self._spawn(self._resync())

    async def repair(self) -> None:
        """Publish our snapshot again if one of our changes did not reach the bus."""
        if self._unpublished:
            await self._publish_snapshot()

    async def wait_for_snapshots(self, timeout: float) -> None:
        """Wait until every other process listening on the bus has sent its snapshot."""
        try:
            expected = await self.bus.listening_origins()
        except self.bus.unavailable as exc:
            log.warning("presence_sync_not_awaited", error=str(exc))
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while missing := [o for o in expected if o not in self._synced_origins]:
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning("presence_sync_incomplete", origins=sorted(missing))
                return
            self._completed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._completed.wait(), remaining)

    # -- the entries held -------------------------------------------------------------
    def _change(self, origin: str, topic: str, joins: Keys, leaves: Keys) -> None:
        topics = self.by_origin.setdefault(origin, {})
        keys = topics.setdefault(topic, {})
        joined, left = merge(keys, joins, leaves)
        if not keys:
            del topics[topic]
        if not topics:
            del self.by_origin[origin]
        self._tell_members(topic, joined, left)

    def _replace(self, origin: str, topics: Topics) -> None:
        """``topics`` is now all that ``origin`` owns; one diff per topic that changed."""
        old = self.by_origin.pop(origin, {})
        if topics:
            self.by_origin[origin] = topics
        for topic in old.keys() | topics.keys():
            joins, leaves = difference(old.get(topic, {}), topics.get(topic, {}))
            self._tell_members(topic, joins, leaves)

    def _tell_members(self, topic: str, joins: Keys, leaves: Keys) -> None:
        if not (joins or leaves):
            return
        self.fanout.presence_diff(topic, as_metas(joins), as_metas(leaves))

    # -- snapshots --------------------------------------------------------------------
    async def _publish_snapshot(self) -> None:
        """Publish every entry this process owns, in chunks; the last one says so."""
        async with self._gate.alone():
            if self._departed:
                return
            self._unpublished = False
            self._snapshot_id += 1
            entries = [
                [topic, key, ref, meta]
                for topic, keys in self.by_origin.get(self.origin, {}).items()
                for key, refs in keys.items()
                for ref, meta in refs.items()
            ]
            packed = chunks(entries, self._chunk_room)
            for seq, part in enumerate(packed):
                message = {
                    "kind": "snapshot",
                    "snapshot": self._snapshot_id,
                    "seq": seq,
                    "last": seq == len(packed) - 1,
                    "entries": part,
                }
                if not await try_publish(self.bus, message):
                    self._unpublished = True
                    return

    async def _ask_for_snapshot(self, origin: str | None) -> None:
        await try_publish(self.bus, {"kind": "sync", "to": origin})

    async def _resync(self) -> None:
        await self._ask_for_snapshot(None)
        await self._publish_snapshot()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("bus_task_failed", error=repr(task.exception()))
