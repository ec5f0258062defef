"""Broadcast and presence between channels of one topic, in this process and in others.

Within a process, a topic's channels are in a dict. Between processes, each message is
published with ``pg_notify('autodispatch_bus', ...)`` and every process (itself
included, told apart by its origin id) hands it to its own channels. NOTIFY payloads
are limited to 8000 bytes: larger broadcasts are refused with a clear error.

Presence: each process (an origin) owns the entries its own clients track; the others
hold a copy per origin, kept from the diffs it publishes. Diffs alone do not converge (a
process that starts or reconnects late missed the earlier ones; one that dies without a
word leaves its entries behind everywhere), so:

- when its listener becomes ready (at start and after every reconnect) a process asks
  everyone for their entries (``sync``) and publishes its own (``snapshot``, in chunks
  that fit a NOTIFY, the last one marked). A complete snapshot replaces what is held for
  its origin, and the members of each topic it changes get one presence diff;
- each process says ``alive`` every ``alive_interval``; an origin not heard from for
  ``SILENT_INTERVALS`` of its own intervals is dropped, with leaves; a clean stop says
  ``bye`` and is dropped at once;
- an origin that says alive but whose complete snapshot we do not hold (it was dropped
  while only slow, or a chunk was lost) is asked for one.

A process's snapshot (or bye) goes out alone, after the presence diffs already going
out and before any later one (``Gate``); PostgreSQL delivers notifications in commit
order, so a snapshot is never overtaken by a diff it does not include, nor a diff by an
older snapshot. What needs no I/O (the entries, diffs, chunks, the gate) is presence.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import defaultdict
from collections.abc import Coroutine
from typing import Any, Protocol

import psycopg
import structlog

from autodispatch.background import Loops, stale_after_for
from autodispatch.db.database import Database
from autodispatch.realtime.presence import (
    Assembly,
    Gate,
    Keys,
    Peer,
    Topics,
    as_metas,
    checked_keys,
    chunks,
    difference,
    encode,
    merge,
)

log = structlog.get_logger("autodispatch.realtime")

BUS_CHANNEL = "autodispatch_bus"
MAX_BUS_PAYLOAD = 7900
# Messages of format 1 (no "v") carried presence as bare diffs, without liveness; they
# are ignored, except broadcasts, whose shape has not changed.
BUS_FORMAT = 2
ALIVE_INTERVAL = 5.0
MAX_ALIVE_INTERVAL = 3600.0  # a peer claiming longer is refused (config.py stops ours)
SILENT_INTERVALS = 3
# The listener's application_name: a process starting finds the others' listeners in
# pg_stat_activity, and waits (at most FIRST_SYNC_SECONDS) for their snapshots.
LISTENER_NAME = "autodispatch-bus "
FIRST_SYNC_SECONDS = 2.0
# The listener waits this long for notifications, then checks its connection with a query.
LISTEN_SECONDS = 5.0


class Member(Protocol):
    """A joined channel, as the broker sees it."""

    def on_broadcast(self, event: str, payload: Any, sender: object | None) -> None: ...

    def on_presence_diff(self, joins: dict[str, Any], leaves: dict[str, Any]) -> None: ...


class PayloadTooLarge(Exception):
    pass


def _presence_diff(topic: str, joins: Keys, leaves: Keys) -> dict[str, Any]:
    # Both joins and leaves, even when empty: processes of format 1 read both and would
    # stop listening on a message without one.
    return {"kind": "presence", "topic": topic, "joins": joins, "leaves": leaves}


class Broker:
    def __init__(
        self, db: Database, *, alive_interval: float = ALIVE_INTERVAL, loops: Loops | None = None
    ) -> None:
        self.db = db
        # Both loops report every run: their errors are counted, /readyz sees them stop.
        self.loops = loops if loops is not None else Loops()
        self._listening = self.loops.register(
            "realtime-bus", stale_after=stale_after_for(LISTEN_SECONDS), event="bus_listen_failed"
        )
        self._alive = self.loops.register(
            "realtime-bus-alive",
            stale_after=stale_after_for(alive_interval),
            event="bus_alive_failed",
        )
        self.origin = uuid.uuid4().hex
        self.alive_interval = alive_interval
        self.members: dict[str, set[Member]] = defaultdict(set)
        # origin -> topic -> presence key -> phx_ref -> meta; this process's own entries
        # are under self.origin.
        self.presence: dict[str, Topics] = {}
        self.peers: dict[str, Peer] = {}
        self.ready = asyncio.Event()  # set while the listener listens
        self._assembling: dict[str, Assembly] = {}
        self._gate = Gate()
        self._snapshot_id = 0
        self._sync_sent_at = float("-inf")
        self._unpublished = False  # an own change did not reach the bus: snapshot again
        self._departed = False  # said bye: publish no more presence
        self._synced = asyncio.Event()  # a snapshot was completed
        self._warned: set[tuple[str, str]] = set()
        self._stop = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._beat: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        header = self._envelope(
            {"kind": "snapshot", "snapshot": 2**53, "seq": 2**31, "last": False, "entries": []}
        )
        self._chunk_room = MAX_BUS_PAYLOAD - len(encode(header))

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="realtime-bus")
        self._beat = asyncio.create_task(self._say_alive(), name="realtime-bus-alive")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ready.wait(), timeout=10)
        if self.ready.is_set():
            # Clients reconnecting right after a deploy should find everyone's presence
            # in presence_state, not in a diff a moment later.
            await self._wait_for_snapshots(FIRST_SYNC_SECONDS)

    async def stop(self) -> None:
        """Say bye (the others drop this process's entries at once), then stop listening."""
        self._stop.set()
        await _cancel(self._beat, *self._tasks)
        async with self._gate.alone():
            if not self._departed:
                self._departed = True
                await self._try_publish({"kind": "bye"})
        await _cancel(self._listener)

    def join(self, topic: str, member: Member) -> None:
        self.members[topic].add(member)

    def leave(self, topic: str, member: Member) -> None:
        self.members[topic].discard(member)
        if not self.members[topic]:
            del self.members[topic]

    async def broadcast(self, topic: str, event: str, payload: Any, sender: object) -> None:
        """Deliver to other processes through NOTIFY and to this process's members.

        Published first: a message too large for the bus is refused before anyone gets it.
        """
        await self._publish(
            {"kind": "broadcast", "topic": topic, "event": event, "payload": payload}
        )
        self._deliver_broadcast(topic, event, payload, sender)

    # -- presence ---------------------------------------------------------------------
    def presence_state(self, topic: str) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for topics in self.presence.values():
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
                    await self._publish(_presence_diff(topic, joins, {}))
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
            entry = self.presence.get(self.origin, {}).get(topic, {}).get(key, {}).get(ref)
            if entry is None:
                return
            leaves = {key: {ref: entry}}
            self._change(self.origin, topic, {}, leaves)
            if self._departed:
                return
            published = False
            try:
                published = await self._try_publish(_presence_diff(topic, {}, leaves))
            finally:  # also when cancelled (a connection closing): repaired by a snapshot
                if not published:
                    self._unpublished = True

    def _change(self, origin: str, topic: str, joins: Keys, leaves: Keys) -> None:
        topics = self.presence.setdefault(origin, {})
        keys = topics.setdefault(topic, {})
        joined, left = merge(keys, joins, leaves)
        if not keys:
            del topics[topic]
        if not topics:
            del self.presence[origin]
        self._tell_members(topic, joined, left)

    def _replace(self, origin: str, topics: Topics) -> None:
        """``topics`` is now all that ``origin`` owns; one diff per topic that changed."""
        old = self.presence.pop(origin, {})
        if topics:
            self.presence[origin] = topics
        for topic in old.keys() | topics.keys():
            joins, leaves = difference(old.get(topic, {}), topics.get(topic, {}))
            self._tell_members(topic, joins, leaves)

    def _drop(self, origin: str, reason: str) -> None:
        self.peers.pop(origin, None)
        self._assembling.pop(origin, None)
        held = self.presence.get(origin, {})
        if held:
            count = sum(len(refs) for keys in held.values() for refs in keys.values())
            log.info("presence_origin_dropped", origin=origin, reason=reason, entries=count)
        self._replace(origin, {})

    def _tell_members(self, topic: str, joins: Keys, leaves: Keys) -> None:
        if not (joins or leaves):
            return
        diff_joins, diff_leaves = as_metas(joins), as_metas(leaves)
        for member in list(self.members.get(topic, ())):
            member.on_presence_diff(diff_joins, diff_leaves)

    async def _publish_snapshot(self) -> None:
        """Publish every entry this process owns, in chunks; the last one says so."""
        async with self._gate.alone():
            if self._departed:
                return
            self._unpublished = False
            self._snapshot_id += 1
            entries = [
                [topic, key, ref, meta]
                for topic, keys in self.presence.get(self.origin, {}).items()
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
                if not await self._try_publish(message):
                    self._unpublished = True
                    return

    async def _wait_for_snapshots(self, timeout: float) -> None:
        """Wait until every other process listening on this database has sent its snapshot."""
        try:
            async with self.db.pool.connection() as conn:
                cur = await conn.execute(
                    "select application_name from pg_stat_activity"
                    " where datname = current_database() and application_name like %s",
                    (LISTENER_NAME + "%",),
                )
                rows = await cur.fetchall()
        except (psycopg.Error, OSError) as exc:
            log.warning("presence_sync_not_awaited", error=str(exc))
            return
        expected = {row["application_name"].removeprefix(LISTENER_NAME) for row in rows}
        expected.discard(self.origin)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while missing := [o for o in expected if not (o in self.peers and self.peers[o].synced)]:
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning("presence_sync_incomplete", origins=sorted(missing))
                return
            self._synced.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._synced.wait(), remaining)

    # -- the bus ----------------------------------------------------------------------
    def _envelope(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"v": BUS_FORMAT, **message, "origin": self.origin, "interval": self.alive_interval}

    async def _publish(self, message: dict[str, Any]) -> None:
        text = encode(self._envelope(message))
        if len(text.encode()) > MAX_BUS_PAYLOAD:
            raise PayloadTooLarge(
                f"this message is {len(text.encode())} bytes; at most {MAX_BUS_PAYLOAD} travel"
                " between servers"
            )
        async with self.db.pool.connection() as conn:
            await conn.execute("select pg_notify(%s, %s)", (BUS_CHANNEL, text))
            await conn.commit()

    async def _try_publish(self, message: dict[str, Any]) -> bool:
        """Publish; on a database error log it and return False (the caller repairs later)."""
        try:
            await self._publish(message)
        except (psycopg.Error, OSError) as exc:
            log.warning("bus_publish_failed", kind=message["kind"], error=str(exc))
            return False
        return True

    def _deliver_broadcast(
        self, topic: str, event: str, payload: Any, sender: object | None
    ) -> None:
        for member in list(self.members.get(topic, ())):
            member.on_broadcast(event, payload, sender)

    def _receive(self, text: str) -> None:
        try:
            message = json.loads(text)
            origin = message["origin"]
            if not isinstance(origin, str):
                raise TypeError("origin is not a string")
        except (ValueError, KeyError, TypeError):
            log.warning("bus_message_unreadable")
            return
        if origin == self.origin:
            return  # delivered locally already
        kind = message.get("kind")
        try:
            if kind == "broadcast":  # in any format: its shape has not changed
                topic, event = message["topic"], message["event"]
                if not (isinstance(topic, str) and isinstance(event, str)):
                    raise TypeError("topic and event must be strings")
                self._deliver_broadcast(topic, event, message["payload"], None)
            if message.get("v") == BUS_FORMAT:
                self._received(origin, kind, message)
            elif kind != "broadcast":
                self._warn_once(origin, f"format {message.get('v')!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("bus_message_malformed", origin=origin, kind=kind, error=repr(exc))
        except Exception:  # a bug here must not stop the bus for the whole process
            log.exception("bus_message_failed", origin=origin, kind=kind)

    def _received(self, origin: str, kind: Any, message: dict[str, Any]) -> None:
        if kind == "bye":
            self._drop(origin, "bye")
            return
        interval = float(message["interval"])
        if not 0 < interval <= MAX_ALIVE_INTERVAL:
            raise ValueError(f"interval {interval} is out of range")
        now = time.monotonic()
        peer = self.peers.get(origin)
        if peer is None:
            peer = self.peers[origin] = Peer(last_heard=now, interval=interval)
        peer.last_heard, peer.interval = now, interval
        if kind == "presence":
            topic = message["topic"]
            if not isinstance(topic, str):
                raise TypeError("topic must be a string")
            joins = checked_keys(message.get("joins", {}))
            leaves = checked_keys(message.get("leaves", {}))
            self._change(origin, topic, joins, leaves)
        elif kind == "snapshot":
            self._receive_chunk(origin, peer, message)
        elif kind == "sync":
            if message.get("to") in (None, self.origin):
                self._spawn(self._publish_snapshot())
        elif kind == "alive":
            # Not synced: it was dropped while only slow, or its snapshot went missing.
            # Its answer to our last sync may still be on its way: ask once per interval.
            if not peer.synced and now >= max(self._sync_sent_at, peer.asked_at) + interval:
                peer.asked_at = now
                self._spawn(self._ask_for_snapshot(origin))
        elif kind != "broadcast":
            self._warn_once(origin, f"kind {kind!r}")

    def _receive_chunk(self, origin: str, peer: Peer, message: dict[str, Any]) -> None:
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
            peer.synced = True
            self._synced.set()

    async def _ask_for_snapshot(self, origin: str | None) -> None:
        await self._try_publish({"kind": "sync", "to": origin})

    def _warn_once(self, origin: str, what: str) -> None:
        if (origin, what) not in self._warned and len(self._warned) < 1000:
            self._warned.add((origin, what))
            log.warning("bus_message_ignored", origin=origin, reason=f"unknown {what}")

    def _listening_again(self) -> None:
        """The listener (re)connected: whatever was sent meanwhile was missed, so ask
        everyone for their entries and say ours."""
        now = time.monotonic()
        self._assembling.clear()
        for peer in self.peers.values():
            peer.last_heard = now  # we heard nothing: that says nothing about them
            peer.synced = False
        self._sync_sent_at = now
        self.ready.set()
        self._spawn(self._resync())

    async def _resync(self) -> None:
        await self._ask_for_snapshot(None)
        await self._publish_snapshot()

    async def _listen(self) -> None:
        """Listen on the bus until stopped; reconnect after any error (a bug in here must
        not end the listener for good: logged, counted, and it listens again)."""
        while not self._stop.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.db.url,
                    autocommit=True,
                    application_name=LISTENER_NAME + self.origin,
                    # A half-open connection (failover, partition) is noticed in about
                    # 20 s rather than whenever the kernel gives up on it.
                    keepalives=1,
                    keepalives_idle=5,
                    keepalives_interval=5,
                    keepalives_count=3,
                )
                async with conn:
                    await conn.execute(f"listen {BUS_CHANNEL}")
                    self._listening_again()
                    self._listening.ok()
                    while not self._stop.is_set():
                        async for note in conn.notifies(timeout=LISTEN_SECONDS):
                            self._receive(note.payload)
                        await conn.execute("select 1")
                        self._listening.ok()  # the connection is alive and we are reading it
            except Exception as exc:
                self.ready.clear()
                self._listening.failed(exc)
                await asyncio.sleep(1.0)
        self.ready.clear()

    async def _say_alive(self) -> None:
        """Say alive every interval; drop origins gone silent; republish our snapshot if
        one of our changes did not reach the bus. Any error is logged and counted, and
        the loop goes on: silence would get our entries dropped everywhere."""
        interval = self.alive_interval
        last = time.monotonic()
        while not self._stop.is_set():
            await asyncio.sleep(interval)
            now = time.monotonic()
            # Woken late, this loop was stalled and so was the listener: what it has not
            # read yet says nothing about the others, so judge them next time.
            stalled = now - last > 2 * interval
            last = now
            failure: Exception | None = None
            try:
                try:
                    await self._publish({"kind": "alive"})
                except (psycopg.Error, OSError) as exc:
                    failure = exc  # judge the others all the same
                else:
                    if self._unpublished:
                        await self._publish_snapshot()
                if self.ready.is_set() and not stalled:
                    for origin, peer in list(self.peers.items()):
                        if now - peer.last_heard > SILENT_INTERVALS * peer.interval:
                            self._drop(origin, "silent")
            except Exception as exc:
                failure = exc
            if failure is None:
                self._alive.ok()
            else:
                self._alive.failed(failure)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("bus_task_failed", error=repr(task.exception()))


async def _cancel(*tasks: asyncio.Task[None] | None) -> None:
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
