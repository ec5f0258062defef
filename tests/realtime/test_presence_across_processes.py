"""Presence converges between processes: one that starts late, or whose listener
reconnects, learns the presences tracked before; the presences of one that stops,
cleanly or not, leave everywhere.

The full apps and `serve` processes are reached by real WebSocket clients (the raw
socket of test_ws_protocol). The brokers on their own (two on one database, a channel
that records what it is told) pin what the apps cannot show quickly: a silence of three
short intervals, a snapshot in chunks, a listener that reconnects.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from live_servers import serve_live
from test_ws_protocol import Raw, ok_response, raw_socket

from autodispatch.db.database import Database
from autodispatch.realtime.broker import Broker
from autodispatch.realtime.peers import SILENT_INTERVALS
from autodispatch.realtime.pg_bus import BUS_CHANNEL, LISTENER_NAME, MAX_BUS_PAYLOAD
from autodispatch.realtime.presence import Gate
from test_serve import Serve

TOPIC = "realtime:lobby"
SHORT = 0.2  # seconds between "alive"s, for brokers whose silence is under test
LONG = 60.0  # an interval no test waits out: what happens is not the silence


class Recorder:
    """A joined channel that keeps what the broker tells it."""

    def __init__(self) -> None:
        self.diffs: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.broadcasts: list[tuple[str, Any]] = []

    def on_broadcast(self, event: str, payload: Any, sender: object | None) -> None:
        self.broadcasts.append((event, payload))

    def on_presence_diff(self, joins: dict[str, Any], leaves: dict[str, Any]) -> None:
        self.diffs.append((joins, leaves))

    def left(self) -> set[str]:
        return {key for _, leaves in self.diffs for key in leaves}


@asynccontextmanager
async def running_broker(db_url: str, alive_interval: float) -> AsyncIterator[Broker]:
    db = Database(db_url, min_size=1, max_size=4)
    await db.open()
    broker = Broker(db, alive_interval=alive_interval)
    try:
        await broker.start()
        yield broker
    finally:
        await broker.stop()
        await db.close()


async def eventually(what: str, condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        await asyncio.sleep(0.02)
    return value


def keys(broker: Broker) -> set[str]:
    return set(broker.presence_state(TOPIC))


def die(broker: Broker) -> None:
    """As if the process were SIGKILLed: it hears and says nothing more, not even bye."""
    for task in (broker.bus._listener, broker.peers._beat):
        assert task is not None
        task.cancel()


async def track(raw: Raw, meta: dict[str, Any]) -> None:
    await raw.join(TOPIC, presence=True)
    ref = await raw.push(TOPIC, "presence", {"type": "presence", "event": "track", "payload": meta})
    ok_response(await raw.reply(TOPIC, ref))


async def presence_state(raw: Raw) -> dict[str, Any]:
    """Join with presence on and return the presence_state the server sends."""
    await raw.join(TOPIC, presence=True)
    (state,) = await raw.wait_for("presence_state", lambda: raw.matching(TOPIC, "presence_state"))
    payload: dict[str, Any] = state.payload
    return payload


def names(state: dict[str, Any]) -> list[str]:
    return sorted(meta["name"] for entry in state.values() for meta in entry["metas"])


def reached(serve: Serve) -> Any:
    """A `serve` process, as raw_socket reaches a server."""
    return SimpleNamespace(base=serve.base, ws_base=f"ws://127.0.0.1:{serve.port}")


async def test_a_process_started_later_gets_the_presence_tracked_before(
    db_url: str, tmp_path: Path
) -> None:
    """A client on a process that started after another's client tracked finds that
    presence in its presence_state."""
    async with serve_live(db_url, tmp_path) as first, raw_socket(first.server) as alice:
        await track(alice, {"name": "alice"})
        async with serve_live(db_url, tmp_path) as second, raw_socket(second.server) as bob:
            assert names(await presence_state(bob)) == ["alice"]


async def test_default_presence_keys_and_refs_are_unique_across_processes(
    db_url: str, tmp_path: Path
) -> None:
    """Clients tracking without a key on two processes get presence keys and phx_refs
    that all differ, are short, and are not made of object ids (which repeat between
    processes, so two presences would be merged or one's leave would remove the other)."""
    async with (
        serve_live(db_url, tmp_path) as first,
        serve_live(db_url, tmp_path) as second,
        raw_socket(first.server) as alice,
        raw_socket(second.server) as bob,
    ):
        await track(alice, {"name": "alice"})
        await track(bob, {"name": "bob"})
        broker = second.server.app.state.gateway.broker
        await eventually("both on the second", lambda: len(broker.presence_state(TOPIC)) == 2)
        object_ids = {
            str(id(channel))
            for live in (first, second)
            for conn in live.server.app.state.gateway.connections
            for channel in conn.channels.values()
        }
        async with raw_socket(second.server) as carol:
            state = await presence_state(carol)
    assert names(state) == ["alice", "bob"]
    refs = [meta["phx_ref"] for entry in state.values() for meta in entry["metas"]]
    made = [*state, *refs]
    assert len(set(made)) == 4, made
    assert all(isinstance(s, str) and 0 < len(s) <= 16 for s in made), made
    assert len(object_ids) == 2
    assert not [s for s in made if any(i in s for i in object_ids)], (made, object_ids)


@pytest.mark.slow
def test_presence_of_a_sigkilled_serve_process_leaves_the_others(
    db_url: str, tmp_path: Path
) -> None:
    """Two `serve` processes: the later one's clients see the earlier one's presence; when
    the earlier one is SIGKILLed, they get the leave after three alive intervals (set to
    1 s through the environment; at the default 5 s the leave would come too late for
    this test), and later clients no longer see it."""
    interval = 1.0
    env = {"DATABASE_URL": db_url, "AUTODISPATCH_REALTIME_PRESENCE_INTERVAL": str(interval)}
    first = Serve(tmp_path, demo=False, env=env)
    first.wait_ready()
    second: Serve | None = None

    async def scenario() -> None:
        nonlocal second
        async with raw_socket(reached(first)) as alice:
            await track(alice, {"name": "alice"})
            second = Serve(tmp_path, demo=False, env=env)
            await asyncio.to_thread(second.wait_ready)
            async with raw_socket(reached(second)) as bob:
                assert names(await presence_state(bob)) == ["alice"]
                first.stop(signal.SIGKILL)
                (diff,) = await bob.wait_for(
                    "the leave of the killed process's client",
                    lambda: [
                        m for m in bob.matching(TOPIC, "presence_diff") if m.payload["leaves"]
                    ],
                    # Silent for three intervals, noticed at the next check, then sent.
                    timeout=(SILENT_INTERVALS + 2) * interval + 5,
                )
                assert names(diff.payload["leaves"]) == ["alice"]
        async with raw_socket(reached(second)) as carol:
            assert await presence_state(carol) == {}

    try:
        asyncio.run(scenario())
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_an_origin_gone_silent_is_dropped_with_leaves(db_url: str) -> None:
    """While a process says alive its presence stays; once it says nothing (no bye
    either), the others drop it within a few intervals and tell their members."""
    async with running_broker(db_url, SHORT) as a, running_broker(db_url, SHORT) as b:
        watcher = Recorder()
        b.join(TOPIC, watcher)
        await a.track(TOPIC, "alice", "a-1", {"name": "alice"})
        await eventually("alice on b", lambda: keys(b) == {"alice"})
        await asyncio.sleep(SHORT * SILENT_INTERVALS * 3)
        assert keys(b) == {"alice"} and not watcher.left()
        die(a)
        await eventually("alice's leave", lambda: watcher.left() == {"alice"}, timeout=5.0)
        assert keys(b) == set()


async def test_an_origin_dropped_while_only_slow_is_asked_again(db_url: str) -> None:
    """A process dropped because it went quiet, that then says alive again, is asked for
    its entries and they come back (its own listener never noticed anything)."""
    async with running_broker(db_url, SHORT) as a, running_broker(db_url, SHORT) as b:
        watcher = Recorder()
        b.join(TOPIC, watcher)
        await a.track(TOPIC, "alice", "a-1", {"name": "alice"})
        await eventually("alice on b", lambda: keys(b) == {"alice"})
        assert a.peers._beat is not None
        a.peers._beat.cancel()  # a stalls: no alive
        await eventually("alice's leave", lambda: watcher.left() == {"alice"}, timeout=5.0)
        a.peers._beat = asyncio.create_task(a.peers._say_alive())
        await eventually("alice again on b", lambda: keys(b) == {"alice"}, timeout=5.0)
        assert watcher.diffs[-1][0] == {"alice": {"metas": [{"name": "alice", "phx_ref": "a-1"}]}}


async def test_a_clean_stop_drops_the_origin_at_once(db_url: str) -> None:
    """A process that stops cleanly says bye: the others drop its presence at once, not
    after three (here minute-long) intervals."""
    async with running_broker(db_url, LONG) as b:
        watcher = Recorder()
        b.join(TOPIC, watcher)
        async with running_broker(db_url, LONG) as a:
            await a.track(TOPIC, "alice", "a-1", {"name": "alice"})
            await eventually("alice on b", lambda: keys(b) == {"alice"})
        await eventually("alice's leave", lambda: watcher.left() == {"alice"}, timeout=5.0)
        assert keys(b) == set()


async def test_a_snapshot_larger_than_one_notify_arrives_whole(db_url: str) -> None:
    """Entries that take several NOTIFYs reach a process that starts later, all of them
    and unchanged, in chunks within the payload limit, the last one marked."""
    async with running_broker(db_url, LONG) as a:
        for i in range(300):
            await a.track(TOPIC, f"user-{i}", f"a-{i}", {"name": f"user {i}", "note": "x" * 100})
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as spy:
            await spy.execute(f"listen {BUS_CHANNEL}")
            async with running_broker(db_url, LONG) as b:
                # start() waited for the snapshots of every process listening.
                assert b.presence_state(TOPIC) == a.presence_state(TOPIC)
                assert len(b.presence_state(TOPIC)) == 300
            notes = [n.payload async for n in spy.notifies(timeout=0.5)]
    chunks = [
        json.loads(text)
        for text in notes
        if json.loads(text)["origin"] == a.origin and json.loads(text)["kind"] == "snapshot"
    ]
    assert len(chunks) > 1
    assert all(len(text.encode()) <= MAX_BUS_PAYLOAD for text in notes)
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert [c["last"] for c in chunks] == [False] * (len(chunks) - 1) + [True]


async def test_a_snapshot_goes_out_alone_between_diffs() -> None:
    """Diffs pass the gate together; a snapshot waits for the diffs passing, and a diff
    that comes after the snapshot waits for it: the bus gets them in that order."""
    gate = Gate()
    order: list[str] = []
    hold_first, hold_snapshot, open_ = asyncio.Event(), asyncio.Event(), asyncio.Event()
    open_.set()

    async def diff(name: str, hold: asyncio.Event) -> None:
        async with gate.diff():
            order.append(f"{name} in")
            await hold.wait()
            order.append(f"{name} out")

    async def snapshot() -> None:
        async with gate.alone():
            order.append("snapshot in")
            await hold_snapshot.wait()
            order.append("snapshot out")

    async def settle() -> None:
        for _ in range(10):
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(diff("first", hold_first))]
    await settle()
    tasks.append(asyncio.create_task(diff("second", open_)))
    await settle()
    tasks.append(asyncio.create_task(snapshot()))
    await settle()
    tasks.append(asyncio.create_task(diff("third", open_)))
    await settle()
    assert order == ["first in", "second in", "second out"]
    hold_first.set()
    await settle()
    assert order[3:] == ["first out", "snapshot in"]
    hold_snapshot.set()
    await asyncio.gather(*tasks)
    assert order[5:] == ["snapshot out", "third in", "third out"]


async def test_a_listener_reconnect_repairs_the_diffs_it_missed(db_url: str) -> None:
    """Changes made while a process's listener was cut off reach its members once it
    reconnects, as one diff with the joins and the leaves."""
    async with running_broker(db_url, LONG) as a, running_broker(db_url, LONG) as b:
        watcher = Recorder()
        b.join(TOPIC, watcher)
        await a.track(TOPIC, "stays", "a-1", {"name": "stays"})
        await a.track(TOPIC, "goes", "a-2", {"name": "goes"})
        await eventually("both on b", lambda: keys(b) == {"stays", "goes"})
        watcher.diffs.clear()
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as admin:
            await admin.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity"
                " where application_name = %s",
                (LISTENER_NAME + b.origin,),
            )
        await eventually("b's listener to drop", lambda: not b.ready.is_set())
        await a.untrack(TOPIC, "goes", "a-2")
        await a.track(TOPIC, "comes", "a-3", {"name": "comes"})
        assert not b.ready.is_set(), "b reconnected too soon: it did not miss the changes"
        await eventually("b to listen again", b.ready.is_set)
        await eventually("the repair", lambda: keys(b) == {"stays", "comes"})
        assert watcher.diffs == [
            (
                {"comes": {"metas": [{"name": "comes", "phx_ref": "a-3"}]}},
                {"goes": {"metas": [{"name": "goes", "phx_ref": "a-2"}]}},
            )
        ]


async def test_messages_of_unknown_or_old_formats_are_ignored(db_url: str) -> None:
    """Unreadable messages, old-format presence and unknown kinds leave presence alone
    and the listener listening; old-format broadcasts are still delivered."""
    async with running_broker(db_url, LONG) as a, running_broker(db_url, LONG) as b:
        watcher = Recorder()
        b.join(TOPIC, watcher)
        junk: list[Any] = [
            "not json",
            [],
            {"origin": 5},
            {"origin": "old", "kind": "presence", "topic": TOPIC, "joins": {"k": {"r": {}}}},
            {"origin": "old", "kind": "broadcast", "topic": TOPIC, "event": "e", "payload": 1},
            {"v": 3, "origin": "new", "kind": "presence", "topic": TOPIC},
            {"v": 2, "origin": "x", "interval": 1, "kind": "teleport"},
            {"v": 2, "origin": "x", "interval": "soon", "kind": "alive"},
            {"v": 2, "origin": "x", "interval": 1, "kind": "presence", "topic": TOPIC, "joins": 7},
            {"v": 2, "origin": "x", "interval": 1, "kind": "snapshot", "snapshot": 1, "seq": 0}
            | {"last": True, "entries": [["two", "only"]]},
        ]
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            for message in junk:
                text = message if isinstance(message, str) else json.dumps(message)
                await conn.execute("select pg_notify(%s, %s)", (BUS_CHANNEL, text))
        await a.track(TOPIC, "alice", "a-1", {"name": "alice"})
        await eventually("alice on b", lambda: keys(b) == {"alice"})
        assert watcher.broadcasts == [("e", 1)]
        assert [set(joins) for joins, _ in watcher.diffs] == [{"alice"}]
