"""Event ids given after commit (migration 0008, realtime/sequencer.py).

Writers insert their events without an id and share no lock; ``realtime.sequence()``
numbers what has committed. These tests hold it to the log's promises: an open writer
holds nobody back, a row's events keep their order, aborted writers leave no hole, no
writer ever waits for another, cursors from before the migration resume, and a server
numbers its own writes at once (not at its next poll).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
from live_servers import serve_live

from autodispatch.background import Loops
from autodispatch.db import migrate
from autodispatch.db.sequencer import Sequencer
from conftest import SSE, _admin, database_url

FLAG = "mech_audio_alerts"


def sequence(conn: psycopg.Connection[Any]) -> int:
    """What a server's sequencer does once: ids for what committed; how many."""
    row = conn.execute("select assigned from realtime.sequence(10000)").fetchone()
    conn.commit()
    assert row is not None
    return int(row[0])


def head(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("select last_id from realtime.stream where id = 1").fetchone()
    conn.commit()
    assert row is not None
    return int(row[0])


def events_after(conn: psycopg.Connection[Any], after: int) -> list[tuple[int, str, Any]]:
    rows = conn.execute(
        "select id, row_id, record->>'description' from realtime.events where id > %s order by id",
        (after,),
    ).fetchall()
    conn.commit()
    return [(r[0], r[1], r[2]) for r in rows]


def flags(conn: psycopg.Connection[Any], count: int, prefix: str = "seq_flag") -> list[str]:
    keys = [f"{prefix}_{i}" for i in range(count)]
    for key in keys:
        conn.execute("insert into feature_flags (key) values (%s)", (key,))
    conn.commit()
    sequence(conn)
    return keys


def touch(conn: psycopg.Connection[Any], key: str, text: str) -> None:
    conn.execute("update feature_flags set description = %s where key = %s", (text, key))


def test_a_writer_open_for_seconds_holds_nobody_back(db_url: str) -> None:
    """While one transaction stays open with an event written, others' events get their
    ids and are readable; the open one gets the next id when it commits. (A horizon that
    waits for the oldest open writer, as a transaction-id horizon does, fails this.)"""
    with psycopg.connect(db_url) as admin, psycopg.connect(db_url) as slow:
        keys = flags(admin, 2)
        start = head(admin)
        touch(slow, keys[0], "slow")  # open, with its event written
        for n in range(3):
            touch(admin, keys[1], f"quick {n}")
            admin.commit()
        time.sleep(0.5)
        assert sequence(admin) == 3
        assert [d for _, _, d in events_after(admin, start)] == ["quick 0", "quick 1", "quick 2"]
        slow.commit()
        assert sequence(admin) == 1
        found = events_after(admin, start)
    assert [i for i, _, _ in found] == list(range(start + 1, start + 5))
    assert found[-1][2] == "slow"


def test_a_row_changed_by_a_writer_that_waited_keeps_its_order(db_url: str) -> None:
    """B changes the row A changed, waiting for A's commit; both are numbered in one run:
    A's event comes first (ids follow insert order, and B could only insert after A
    committed). Numbered in any other order, the row would go back in time."""
    with psycopg.connect(db_url) as admin, psycopg.connect(db_url) as a:
        (key,) = flags(admin, 1)
        start = head(admin)
        touch(a, key, "first")

        def b() -> None:
            with psycopg.connect(db_url) as conn:
                touch(conn, key, "second")  # waits for A's row lock
                conn.commit()

        other = threading.Thread(target=b)
        other.start()
        time.sleep(0.3)
        a.commit()
        other.join(timeout=10)
        assert sequence(admin) == 2
        assert [d for _, _, d in events_after(admin, start)] == ["first", "second"]


def test_aborted_and_killed_writers_leave_no_hole(db_url: str) -> None:
    """Events of a rolled-back transaction and of one whose connection died are never
    numbered; the ids of the committed ones follow each other."""
    with psycopg.connect(db_url) as admin:
        keys = flags(admin, 4)
        start = head(admin)
        killed = psycopg.connect(db_url)
        with psycopg.connect(db_url) as rolled_back:
            for key in keys[:2]:
                touch(rolled_back, key, "rolled back")
            touch(admin, keys[3], "kept 1")
            admin.commit()
            touch(killed, keys[2], "killed")
            pid = killed.info.backend_pid
            rolled_back.rollback()
            touch(admin, keys[3], "kept 2")
            admin.commit()
            admin.execute("select pg_terminate_backend(%s)", (pid,))
            admin.commit()
            touch(admin, keys[3], "kept 3")
            admin.commit()
            assert sequence(admin) == 3
        with contextlib.suppress(psycopg.Error):
            killed.close()
        found = events_after(admin, start)
    assert [(i, d) for i, _, d in found] == [
        (start + 1, "kept 1"),
        (start + 2, "kept 2"),
        (start + 3, "kept 3"),
    ]


WRITERS = 16
COMMITS = 40


def test_no_writer_waits_for_another_writer(db_url: str) -> None:
    """A burst of writers, each on rows of its own, with a sequencer running beside them:
    sampled every millisecond, no writer ever waits for a lock (the log's stream row, the
    NOTIFY queue's lock, anything another writer holds; only the page-extension lock of
    a shared table, which the same writes take without the log, is not counted). Every
    event is numbered once, gap-free. With ids given inside the writers' commits
    (realtime.stream locked, NOTIFY sent) the writers queue up behind each other and
    this fails."""
    with psycopg.connect(db_url) as admin:
        keys = flags(admin, WRITERS, prefix="burst")
        start = head(admin)
    done = threading.Event()
    waits: list[tuple[Any, ...]] = []
    samples = 0
    errors: list[str] = []

    def sample() -> None:
        nonlocal samples
        with psycopg.connect(db_url, autocommit=True) as conn:
            while not done.is_set():
                waits.extend(
                    conn.execute(
                        "select a.pid, a.wait_event_type, a.wait_event, pg_blocking_pids(a.pid)"
                        " from pg_stat_activity a"
                        " where a.application_name = 'burst-writer'"
                        " and a.wait_event_type = 'Lock'"
                        # Extending a table's file by a page is a lock of microseconds
                        # that writers inserting into any shared table take, log or not.
                        " and a.wait_event <> 'extend'"
                    ).fetchall()
                )
                samples += 1
                time.sleep(0.001)

    def sequencer() -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            while not done.is_set():
                conn.execute("select realtime.sequence(10000)")
                time.sleep(0.001)

    def writer(key: str) -> None:
        try:
            with psycopg.connect(db_url, application_name="burst-writer") as conn:
                for n in range(COMMITS):
                    touch(conn, key, f"{key} {n}")
                    conn.commit()
        except Exception as exc:
            errors.append(repr(exc))

    helpers = [threading.Thread(target=sample), threading.Thread(target=sequencer)]
    writers = [threading.Thread(target=writer, args=(key,)) for key in keys]
    for t in helpers + writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    for t in helpers:
        t.join()
    assert errors == []
    assert samples > 50, "the sampler must have watched the burst"
    assert waits == [], f"writers waited for locks: {waits[:5]}"
    with psycopg.connect(db_url) as admin:
        sequence(admin)
        found = events_after(admin, start)
    assert [i for i, _, _ in found] == list(range(start + 1, start + 1 + WRITERS * COMMITS))
    for key in keys:  # per row, in the order written
        mine = [d for _, row, d in found if row == key]
        assert mine == [f"{key} {n}" for n in range(COMMITS)]


def test_cursors_from_before_the_migration_resume_without_a_hole(pg_server: str) -> None:
    """Events numbered by the code before migration 0008 (ids given in the commit) and
    events numbered after it form one gap-free log: a cursor from before resumes."""
    name = f"autodispatch_m_{int(time.time() * 1000)}"
    with _admin(pg_server) as conn:
        conn.execute(f'create database "{name}"')
    url = database_url(pg_server, name)
    try:
        migrate.upgrade(url, "0007")
        with psycopg.connect(url) as conn:
            for n in range(5):
                touch(conn, FLAG, f"old {n}")
                conn.commit()
            old = events_after(conn, 0)
        cursor = old[2][0]  # a client that saw up to the third
        migrate.upgrade(url)
        with psycopg.connect(url) as conn:
            for n in range(3):
                touch(conn, FLAG, f"new {n}")
                conn.commit()
            assert sequence(conn) == 3
            resumed = events_after(conn, cursor)
    finally:
        with _admin(pg_server) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')
    assert [i for i, _, _ in resumed] == list(range(cursor + 1, cursor + 6))
    assert [d for _, _, d in resumed] == ["old 3", "old 4", "new 0", "new 1", "new 2"]


async def test_a_poke_numbers_at_once_and_the_poll_catches_writes_from_elsewhere(
    db_url: str,
) -> None:
    """``poke`` runs the sequencer without waiting for its timer; with no poke, a write
    made by SQL from elsewhere is numbered by the timer. Both report to /readyz's loops."""
    numbered: list[int] = []
    loops = Loops()
    slow = Sequencer(db_url, poll_interval=60, on_sequenced=lambda n, _last: numbered.append(n))
    stop = asyncio.Event()
    task = asyncio.create_task(slow.run(stop, loops))
    try:
        await asyncio.sleep(0.2)  # its first run is done: now it waits a minute
        with psycopg.connect(db_url) as conn:
            touch(conn, FLAG, "poked")
            conn.commit()
        slow.poke()
        for _ in range(100):
            if numbered:
                break
            await asyncio.sleep(0.02)
        assert numbered, "a poke runs the sequencer at once"
        assert loops["realtime-sequencer"].stale_reason() is None
    finally:
        stop.set()
        slow.poke()
        await asyncio.wait_for(task, 10)

    quick = Sequencer(db_url, poll_interval=0.05, on_sequenced=lambda n, _last: numbered.append(n))
    stop = asyncio.Event()
    task = asyncio.create_task(quick.run(stop, loops))
    try:
        with psycopg.connect(db_url) as conn:
            touch(conn, FLAG, "from elsewhere")
            conn.commit()
            before = len(numbered)
            for _ in range(100):
                if len(numbered) > before:
                    break
                await asyncio.sleep(0.02)
            assert len(numbered) > before, "the timer numbers writes nobody poked about"
    finally:
        stop.set()
        quick.poke()
        await asyncio.wait_for(task, 10)


async def test_pokes_under_load_fold_into_one_run_per_spacing_and_sparse_ones_wait_not(
    db_url: str,
) -> None:
    """With ``spacing``, commits poked about faster than that are numbered together by
    one run after the spacing, not by one run each; a poke that comes after a quiet
    spell is numbered at once."""
    numbered: list[tuple[int, float]] = []
    loop = asyncio.get_running_loop()
    sequencer = Sequencer(
        db_url,
        poll_interval=60,
        spacing=0.4,
        on_sequenced=lambda n, _last: numbered.append((n, loop.time())),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(sequencer.run(stop))
    try:
        await asyncio.sleep(0.6)  # the first run and its spacing are over
        numbered.clear()
        with psycopg.connect(db_url, autocommit=True) as conn:
            for i in range(5):
                touch(conn, FLAG, f"burst {i}")
                sequencer.poke()
                await asyncio.sleep(0.02)
        for _ in range(100):
            if sum(n for n, _ in numbered) >= 5:
                break
            await asyncio.sleep(0.02)
        assert [n for n, _ in numbered] == [1, 4], numbered
        await asyncio.sleep(0.6)  # quiet for longer than the spacing
        with psycopg.connect(db_url, autocommit=True) as conn:
            touch(conn, FLAG, "after a quiet spell")
            poked = loop.time()
            sequencer.poke()
        for _ in range(100):
            if len(numbered) == 3:
                break
            await asyncio.sleep(0.01)
        assert len(numbered) == 3 and numbered[2][1] - poked < 0.3, numbered
    finally:
        stop.set()
        sequencer.poke()
        await asyncio.wait_for(task, 10)


async def test_a_server_numbers_its_own_writes_at_once(db_url: str, tmp_path: Path) -> None:
    """With the timer set to a minute, a request created through the API still reaches a
    subscriber within seconds: the commit pokes the server's sequencer."""
    async with serve_live(db_url, tmp_path, realtime_sequence_poll_interval=60.0) as world:
        await asyncio.sleep(0.5)  # the sequencer's first run is over
        customer = await world.make("cara", "customer")
        mo = await world.make("mo", "mechanic")
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream(
                "GET",
                f"{world.server.base}/realtime/v1/sse?tables=session_assignments",
                headers=mo.headers,
            ) as response,
        ):
            sse = SSE(response)
            assert (await sse.next())["event"] == "subscribed"
            queued = await world.queued(client, customer)
            started = time.monotonic()
            (event,) = await asyncio.wait_for(sse.changes(1), 5)
            assert event["json"]["record"]["id"] == queued["assignment"]["id"]
            assert time.monotonic() - started < 5


def test_prune_keeps_what_a_writer_open_for_long_numbered_after(db_url: str) -> None:
    """An event's time is when it was written: a writer that stayed open gets a high id
    with an old time. Pruning must stop at the first event still inside the window (by
    id), not drop everything below that old one."""
    with psycopg.connect(db_url, autocommit=True) as admin, psycopg.connect(db_url) as slow:
        admin.execute("insert into feature_flags (key) values ('p_slow'), ('p_quick')")
        admin.execute("select realtime.sequence(1000)")
        slow.execute("update feature_flags set description = 'slow' where key = 'p_slow'")
        time.sleep(2.5)  # the slow writer stays open
        admin.execute("update feature_flags set description = 'young' where key = 'p_quick'")
        admin.execute("select realtime.sequence(1000)")
        slow.commit()
        admin.execute("select realtime.sequence(1000)")
        row = admin.execute(
            "select id from realtime.events where record->>'description' = 'young'"
        ).fetchone()
        assert row is not None
        young = row[0]
        admin.execute("select realtime.prune(interval '2 seconds')")
        kept = admin.execute(
            "select record->>'description' from realtime.events where id >= %s order by id",
            (young,),
        ).fetchall()
        horizon = admin.execute("select pruned_through from realtime.stream").fetchone()
    assert [d for (d,) in kept] == ["young", "slow"]
    assert horizon is not None and horizon[0] < young
