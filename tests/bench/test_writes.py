"""`autodispatch bench writes` measures what it says, and leaves the database as it found it."""

from __future__ import annotations

import asyncio

import psycopg

from autodispatch.bench.realtime.workload import Member, create_population
from autodispatch.bench.writes import CAPTURED, MODES, Run, run_writes


async def test_each_mode_commits_and_the_log_is_whole_again_after(db_url: str) -> None:
    """Two chat writers per mode for half a second: every mode commits; with the log on
    (numbered after commit, at commit as before 0008, or decoded from the WAL) the reader
    gets an event for each measured commit, and the log's lag after each round is measured;
    afterwards the capture triggers are on, the baseline's trigger, the decoder's slot and
    publication are gone, the tables are back to their default replica identity, and every
    event written has an id, gap-free."""
    members = await create_population(db_url, 6, lambda _: None)
    customers = [m for m in members if m.kind == "customer"]
    mechanics = [m for m in members if m.mechanic_id is not None]
    runs = await _run(db_url, customers, mechanics)
    assert [r.mode for r in runs] == list(MODES)
    for run in runs:
        assert run.commits > 0 and run.rate > 0, run
        assert len(run.round_rates) == 2 and min(run.round_rates) > 0, run  # each round ran
    for run in runs:
        if run.mode != "off":
            assert len(run.received_ms) >= run.commits, run
            assert len(run.catch_up) == 2 and 0 < run.kept_rate <= run.rate, run
    with psycopg.connect(db_url) as conn:
        triggers = conn.execute(
            "select c.relname, t.tgname, t.tgenabled from pg_trigger t"
            " join pg_class c on c.oid = t.tgrelid where not t.tgisinternal"
            " and (t.tgname = 'a_realtime_capture' or c.relname = 'events')"
        ).fetchall()
        conn.execute("select realtime.sequence(100000)")
        ids = [r[0] for r in conn.execute("select id from realtime.events order by id")]
        unnumbered = conn.execute("select count(*) from realtime.events where id is null")
        left = unnumbered.fetchone()
        slots = conn.execute("select slot_name from pg_replication_slots").fetchall()
        publications = conn.execute("select pubname from pg_publication").fetchall()
        identities = conn.execute(
            "select relname, relreplident from pg_class where relname = any(%s)",
            (list(CAPTURED),),
        ).fetchall()
    assert sorted((t, e) for t, _, e in triggers) == sorted((t, "O") for t in CAPTURED)
    assert ids == list(range(ids[0], ids[0] + len(ids))) and left == (0,)
    assert slots == [] and publications == [], (slots, publications)
    assert sorted(identities) == sorted((t, "d") for t in CAPTURED)


async def _run(db_url: str, customers: list[Member], mechanics: list[Member]) -> list[Run]:
    return await asyncio.to_thread(
        run_writes,
        db_url,
        customers,
        mechanics,
        writer_counts=(2,),
        workloads=("chat",),
        seconds=0.5,
        rounds=2,
        warmup=0.2,
        progress=lambda _: None,
    )
