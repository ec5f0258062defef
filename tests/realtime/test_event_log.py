"""The event log: written by triggers in the writer's transaction, numbered after commit
by the sequencer (``realtime.sequence()``, as every server runs it), read gap-free in
order."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import psycopg


def _flags(conn: psycopg.Connection[Any], count: int) -> list[str]:
    keys = [f"load_flag_{i}" for i in range(count)]
    for key in keys:
        conn.execute("insert into feature_flags (key) values (%s)", (key,))
    conn.commit()
    return keys


def test_concurrent_writers_committing_out_of_order_skip_nothing(db_url: str) -> None:
    """Many writers commit out of order; a polling reader sees every event once, in order,
    and no row ever goes back in time."""
    with psycopg.connect(db_url) as setup:
        keys = _flags(setup, 12)
        start = setup.execute("select last_id from realtime.stream").fetchone()
        assert start is not None
    writers, transactions = 8, 40
    stop = threading.Event()
    seen: list[tuple[int, str, dict[str, Any]]] = []
    reader_errors: list[str] = []

    def reader() -> None:
        position = start[0]
        with psycopg.connect(db_url, autocommit=True) as conn:
            while True:
                # Read the flag before querying: once it is set, every writer has
                # committed, so an empty answer then really is the end of the log.
                stopping = stop.is_set()
                conn.execute("select realtime.sequence(10000)")  # as a server does
                rows = conn.execute(
                    "select id, row_id, record from realtime.events where id > %s order by id",
                    (position,),
                ).fetchall()
                for event_id, row_id, record in rows:
                    if event_id != position + 1:
                        reader_errors.append(f"after {position} came {event_id}")
                    position = event_id
                    seen.append((event_id, row_id, record))
                if stopping and not rows:
                    return
                time.sleep(0.001)

    writer_errors: list[str] = []

    def writer(seed: int) -> None:
        try:
            write(seed)
        except Exception as exc:  # reported by the assertion below, not lost in a thread
            writer_errors.append(f"writer {seed}: {exc!r}")

    def write(seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(db_url) as conn:
            for n in range(transactions):
                # Rows in a fixed order (ordinary deadlocks between rows are not the point);
                # some transactions write several rows that others write one of.
                for key in sorted(rng.sample(keys, rng.randint(1, 3))):
                    conn.execute(
                        "update feature_flags set enabled = not enabled, description = %s"
                        " where key = %s",
                        (f"w{seed}-t{n}", key),
                    )
                    time.sleep(rng.random() * 0.003)
                # Hold the transaction open a random while before committing, so that
                # transactions which wrote their events later commit first.
                time.sleep(rng.random() * 0.004)
                conn.commit()

    read = threading.Thread(target=reader)
    read.start()
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    read.join(timeout=30)
    assert writer_errors == []
    assert reader_errors == []
    with psycopg.connect(db_url) as conn:
        stored = conn.execute(
            "select id from realtime.events where id > %s order by id", (start[0],)
        ).fetchall()
        final = dict(
            conn.execute(
                "select key, description from feature_flags where key like 'load_flag_%'"
            ).fetchall()
        )
    ids = [event_id for event_id, _, _ in seen]
    assert ids == [r[0] for r in stored], "the reader saw exactly the stored events, in order"
    assert len(ids) == len(set(ids)) and len(ids) >= writers * transactions
    # Per row, the last event the reader saw is the row's final state (nothing older won).
    last: dict[str, dict[str, Any]] = {}
    for _, row_id, record in seen:
        last[row_id] = record
    for key in keys:
        if key in last:
            assert last[key]["description"] == final[key]


def test_event_carries_rows_and_keys_of_both_versions(db_url: str) -> None:
    """An assignment update writes one event with old and new rows and their visibility keys."""
    with psycopg.connect(db_url) as conn:
        user = conn.execute(
            "insert into auth.users (email, password_hash) values ('e@t.example', 'x') returning id"
        ).fetchone()
        assert user is not None
        conn.execute(
            "insert into profiles (id, account_type, full_name) values (%s, 'customer', 'E')",
            (user[0],),
        )
        intake = conn.execute(
            "insert into intakes (customer_id, name, vehicle_year, vehicle_make, vehicle_model,"
            " concern) values (%s, 'Eve Q', 2010, 'A', 'B', 'c') returning id",
            (user[0],),
        ).fetchone()
        assert intake is not None
        session = conn.execute(
            "insert into sessions (customer_id, intake_id, type) values (%s, %s, 'free')"
            " returning id",
            (user[0], intake[0]),
        ).fetchone()
        assert session is not None
        conn.commit()
        before = conn.execute("select last_id from realtime.stream").fetchone()
        assert before is not None
        conn.execute(
            "update session_assignments set status = 'queued', queued_at = now()"
            " where session_id = %s",
            (session[0],),
        )
        conn.commit()
        conn.execute("select realtime.sequence(10000)")
        events = conn.execute(
            "select table_name, type, old_record->>'status', record->>'status', old_keys, new_keys,"
            " record ? 'visibility_keys'"
            " from realtime.events where id > %s order by id",
            (before[0],),
        ).fetchall()
    owner = f"user:{user[0]}"
    by_table = {e[0]: e for e in events}
    assignment = by_table["session_assignments"]
    assert assignment[1:4] == ("UPDATE", "pending_waiver", "queued")
    assert set(assignment[4]) == {"admin", owner}
    assert set(assignment[5]) == {"admin", owner, "pool:general"}
    # The session's keys follow its assignment, so its event says it entered the pool too.
    sess = by_table["sessions"]
    assert set(sess[4]) == {"admin", owner} and set(sess[5]) == {"admin", owner, "pool:general"}
    assert sess[6] is False, "the stored keys column is not sent to clients"


def test_rolled_back_changes_write_no_event(db_url: str) -> None:
    """A transaction that rolls back leaves no event and no gap in the ids."""
    with psycopg.connect(db_url) as conn:
        before = conn.execute("select last_id from realtime.stream").fetchone()
        assert before is not None
        conn.execute("update feature_flags set enabled = false where key = 'mech_audio_alerts'")
        conn.rollback()
        conn.execute("update feature_flags set enabled = false where key = 'mech_audio_alerts'")
        conn.commit()
        conn.execute("select realtime.sequence(10000)")
        ids = [
            r[0]
            for r in conn.execute(
                "select id from realtime.events where id > %s order by id", (before[0],)
            ).fetchall()
        ]
    assert ids == [before[0] + 1]


def test_prune_keeps_recent_events_and_records_the_horizon(db_url: str) -> None:
    """Pruning drops old events and remembers the last dropped id for re-sync decisions."""
    with psycopg.connect(db_url) as conn:
        for _ in range(3):
            conn.execute(
                "update feature_flags set enabled = not enabled where key = 'mech_audio_alerts'"
            )
            conn.commit()
        conn.execute("select realtime.sequence(10000)")
        last = conn.execute("select last_id from realtime.stream").fetchone()
        assert last is not None
        conn.execute(
            "update realtime.events set at = now() - interval '8 days' where id < %s", (last[0],)
        )
        conn.commit()
        pruned = conn.execute("select realtime.prune(interval '7 days')").fetchone()
        conn.commit()
        assert (pruned is not None and pruned[0] == last[0] - 1 - 0) or pruned[0] >= 2
        horizon = conn.execute("select pruned_through from realtime.stream").fetchone()
        remaining = conn.execute("select min(id) from realtime.events").fetchone()
    assert horizon is not None and remaining is not None
    assert horizon[0] == last[0] - 1 and remaining[0] == last[0]
