"""Races between a change of a user's keys and their subscriptions (found in review).

Each forces its moment deterministically: the test holds up the reader, the client or
the read of the removals, then checks the subscriber ends up with what row-level
security shows, and that nothing else is closed.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from live_servers import NATIVE, serve_live
from test_resume import started_hub, wait_until
from test_ws_protocol import ASSIGNMENTS, FLAGS, log_head, produce_flag_events, raw_socket

from autodispatch.domain.principal import Principal
from autodispatch.realtime.events import Event
from autodispatch.realtime.router import Binding

MOVE = "update public.mechanics set workshop_id = %s where user_id = %s"


async def sql(db_url: str, statement: str, *params: Any) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(statement, params)


class HookSink:
    """Records every frame (id, table, type, row); runs ``hook`` (awaited, once) when the
    frame of event ``hook_at()`` is offered."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, str, str, str, bool]] = []
        self.closed_reason: str | None = None
        self.hook_at: Any = None
        self.hook: Any = None

    def offer(self, event: Event, ids: tuple[int, ...], data_json: str) -> bool:
        if self.closed_reason is not None:
            return False
        data = json.loads(data_json)
        row = (data.get("record") or data.get("old_record") or {}).get("id", "")
        self.frames.append((event.id, event.table, data["type"], str(row), event.final))
        return True

    async def wait_offer(
        self, event: Event, ids: tuple[int, ...], data_json: str, timeout: float
    ) -> bool:
        if self.hook is not None and self.hook_at is not None and event.id == self.hook_at():
            hook, self.hook = self.hook, None
            await hook()
        return self.offer(event, ids, data_json)

    def close(self, reason: str) -> None:
        self.closed_reason = self.closed_reason or reason


BINDINGS = (
    Binding(id=1, table="session_assignments", event="*"),
    Binding(id=2, table="feature_flags", event="*"),
)


def principal(account: Any) -> Principal:
    return Principal(user_id=account.id, role="authenticated", account_type=account.account_type)


async def settled(hub: Any, db_url: str) -> None:
    head = await log_head(db_url)
    await wait_until(lambda: hub.reader.routed >= head)
    await wait_until(lambda: not hub._rekeying)
    await asyncio.sleep(0.2)


async def last_id(db_url: str) -> int:
    """The log's last id as it is (``log_head`` numbers waiting events first)."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        cur = await conn.execute("select last_id from realtime.stream where id = 1")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def south_and_north(world: Any, http: httpx.AsyncClient) -> tuple[Any, Any, Any, str]:
    """A customer, Rita (South workshop), Nora (North), and a queued South request (id)."""
    customer = await world.make("cara", "customer")
    rita = await world.make("rita", "mechanic", workshop="South")
    nora = await world.make("nora", "mechanic", workshop="North")
    south = (await world.queued(http, customer, rita.workshop_id))["assignment"]["id"]
    return customer, rita, nora, south


def park_reader(hub: Any) -> asyncio.Event:
    """From now on the hub's log reader waits before each read until the returned event
    is set: the moments a lagging reader opens, made on purpose."""
    gate = asyncio.Event()
    read_available = hub.reader.read_available

    async def gated() -> int:
        await gate.wait()
        return int(await read_available())

    hub.reader.read_available = gated
    return gate


async def test_a_row_let_in_by_a_change_the_replay_applied_arrives(
    db_url: str, tmp_path: Path
) -> None:
    """Rita (South) is moved to North just after her fresh join read her keys; the reader
    routes the move before she is registered, so the join becomes a replay from the keys'
    snapshot. While the replay delivers its last page (a slow client), a North request is
    queued and routed by the reader: the subscription, re-keyed by the replay, must be
    filed under the North keys at once to collect it (the replay's pages were read
    before it committed)."""
    async with (
        serve_live(db_url, tmp_path, NATIVE) as world,
        started_hub(db_url) as hub,
        httpx.AsyncClient(timeout=10) as http,
    ):
        customer, rita, nora, south = await south_and_north(world, http)
        await settled(hub, db_url)
        read_keys = hub._keys_and_head
        flag: list[int] = []

        async def keys_then_move(user_id: Any) -> Any:
            found = await read_keys(user_id)
            await sql(db_url, MOVE, nora.workshop_id, rita.id)
            flag.extend(await produce_flag_events(db_url, 1, 16))
            await wait_until(lambda: hub.reader.routed >= flag[-1])
            return found

        north: list[str] = []

        async def queue_north() -> None:
            r = await world.queued(http, customer, nora.workshop_id)
            north.append(r["assignment"]["id"])
            head = await log_head(db_url)
            await wait_until(lambda: hub.reader.routed >= head)

        sink = HookSink()
        sink.hook_at = lambda: flag[0]
        sink.hook = queue_north
        hub._keys_and_head = keys_then_move
        try:
            sub = await hub.subscribe(principal(rita), BINDINGS, sink, "test")
        finally:
            hub._keys_and_head = read_keys
        assert hub.needs_catch_up(sub)
        await hub.catch_up(sub)
        fence = await produce_flag_events(db_url, 1, 16)
        await settled(hub, db_url)
        got = [(t, ty, row) for _, t, ty, row, _ in sink.frames]
        assert ("session_assignments", "DELETE", south) in got
        assert got[-1][0] == "feature_flags" and sink.frames[-1][0] == fence[0]
        assert ("session_assignments", "UPDATE", north[0]) in got, (
            "the North request rita may see (RLS) never arrived"
        )


async def test_changes_already_in_a_fresh_joins_keys_are_not_applied_again(
    db_url: str, tmp_path: Path
) -> None:
    """Rita is moved South -> North -> South (a move and its undo) a moment before she
    joins afresh; the reader has not yet read those two events. Her keys (South) already
    include both changes: applied again from the reader's position, they would send her
    the South request she can see (and could all along) as a DELETE."""
    async with (
        serve_live(db_url, tmp_path, NATIVE) as world,
        started_hub(db_url) as hub,
        httpx.AsyncClient(timeout=10) as http,
    ):
        _customer, rita, nora, south = await south_and_north(world, http)
        await settled(hub, db_url)
        gate = park_reader(hub)
        await asyncio.sleep(0.6)  # the reader is now parked at the gate
        await sql(db_url, MOVE, nora.workshop_id, rita.id)
        await sql(db_url, MOVE, rita.workshop_id, rita.id)
        sink = HookSink()
        sub = await hub.subscribe(principal(rita), BINDINGS, sink, "test")
        assert not hub.needs_catch_up(sub), "the live path (reader behind the keys' head)"
        gate.set()
        fence = await produce_flag_events(db_url, 1, 16)
        await settled(hub, db_url)
        r = await http.get(f"{world.server.base}/api/mechanic/queue", headers=rita.headers)
        assert south in {a["id"] for a in r.json()["items"]}, "RLS: rita sees the South request"
        assert [f[0] for f in sink.frames] == fence, f"got {sink.frames}"


@pytest.mark.parametrize("action", ["leave", "rejoin", "nothing"])
async def test_leaving_a_channel_while_its_key_change_reads_removals_closes_nothing_else(
    db_url: str, tmp_path: Path, action: str
) -> None:
    """Rita has two channels on one socket. She is moved; while the key change of channel
    A reads its removals (held up by a lock), she leaves or rejoins channel A. That
    channel's removals stop; the socket, and channel B on it, go on (a removal that
    could not be offered to a channel gone is not a slow consumer)."""
    async with (
        serve_live(db_url, tmp_path, NATIVE) as world,
        httpx.AsyncClient(timeout=10) as http,
    ):
        hub = world.server.app.state.realtime
        _, rita, nora, _ = await south_and_north(world, http)
        async with raw_socket(world.server) as raw:
            a, b = "realtime:queue", "realtime:flags"
            assert (await raw.join(a, [ASSIGNMENTS, FLAGS], token=rita.token)).payload[
                "status"
            ] == "ok"
            assert (await raw.join(b, [FLAGS], token=rita.token)).payload["status"] == "ok"
            await raw.wait_for("subscribed", lambda: len(raw.matching(b, "system")) >= 1)
            async with await psycopg.AsyncConnection.connect(world.db_url) as locker:
                # rows_leaving_view reads probe_pings: hold it so the removals' read waits.
                await locker.execute("lock table public.probe_pings in access exclusive mode")
                await sql(world.db_url, MOVE, nora.workshop_id, rita.id)
                for _ in range(200):
                    if list(hub._rekeying):
                        break
                    await asyncio.sleep(0.02)
                assert list(hub._rekeying), "the key change is under way"
                await asyncio.sleep(0.3)
                if action == "leave":
                    ref = await raw.push(a, "phx_leave", {})
                    await raw.reply(a, ref)
                elif action == "rejoin":
                    r = await raw.join(a, [ASSIGNMENTS, FLAGS], token=rita.token)
                    assert r.payload["status"] == "ok"
                await locker.rollback()
            await asyncio.sleep(1.0)
            await sql(
                world.db_url,
                "update public.feature_flags set description = 'after' where key = %s",
                "mech_audio_alerts",
            )
            await asyncio.sleep(1.0)
            assert raw.closed is None, f"socket closed: {raw.closed}"
            assert any(r["table"] == "feature_flags" for r in raw.rows(b)[-1:])


@pytest.mark.parametrize("touch_row", [False, True])
async def test_a_row_whose_change_has_no_id_yet_still_gets_its_removal(
    db_url: str, tmp_path: Path, touch_row: bool
) -> None:
    """Rita's South request has no event left in the log (pruned). She is moved to North
    while a change of that request has committed but has no id yet (a sequencer is busy):
    the removal must still be sent. Its unnumbered event will be numbered after the move,
    so the request's state at the move is the version before that event."""
    async with (
        serve_live(db_url, tmp_path, NATIVE) as world,
        started_hub(db_url) as hub,
        httpx.AsyncClient(timeout=10) as http,
    ):
        _customer, rita, nora, south = await south_and_north(world, http)
        await settled(hub, db_url)
        # The request is older than the retention window: its events are pruned.
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            await conn.execute(
                "update realtime.events set at = now() - interval '30 days' where id is not null"
            )
            await conn.execute("select realtime.prune(interval '7 days')")
        sink = HookSink()
        sub = await hub.subscribe(principal(rita), BINDINGS, sink, "test")
        assert not hub.needs_catch_up(sub)

        gate = park_reader(hub)
        await asyncio.sleep(0.6)  # the reader is parked at the gate
        before = await last_id(db_url)
        await sql(db_url, MOVE, nora.workshop_id, rita.id)  # K: rita leaves South
        for _ in range(200):
            if await last_id(db_url) > before:
                break
            await asyncio.sleep(0.02)
        k = await last_id(db_url)
        assert k > before, "K numbered by a sequencer"
        # Sequencers busy for a moment (any sequencer holding the stream's row lock).
        lock = await psycopg.AsyncConnection.connect(db_url)
        await lock.execute("select 1 from realtime.stream where id = 1 for update")
        if touch_row:
            # Any committed change of the South request, after K: no id yet.
            await sql(
                db_url,
                "update public.session_assignments set request_summary ="
                ' request_summary || \'{"note": "x"}\' where id = %s',
                south,
            )
        gate.set()
        await wait_until(lambda: hub.reader.routed >= k)
        await wait_until(lambda: not hub._rekeying)
        await asyncio.sleep(0.3)
        await lock.rollback()
        await lock.close()
        await produce_flag_events(db_url, 1, 16)
        await settled(hub, db_url)
        got = [(t, ty, row) for _, t, ty, row, _ in sink.frames]
        r = await http.get(f"{world.server.base}/api/mechanic/queue", headers=rita.headers)
        rls = {a["id"] for a in r.json()["items"]}
        assert south not in rls
        assert ("session_assignments", "DELETE", south) in got, (
            "rita was never told that the South request left her view"
        )
