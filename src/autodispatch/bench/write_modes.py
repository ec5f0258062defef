"""The modes of `bench writes`: the event log as it is (capture triggers on), numbered in
each commit as before migration 0008 ("at commit"), written from the WAL by the decoder
("decoded", the measured alternative), or off; each switched on a database in use."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from typing import Any

import psycopg

CAPTURED = ("sessions", "session_assignments", "feature_flags", "session_messages", "probe_pings")


# The numbering before migration 0008, for the baseline mode "at commit": a deferred
# trigger takes realtime.stream's row lock and sends a NOTIFY in every writer's commit.
_AT_COMMIT = """
create function realtime.bench_assign_id_at_commit() returns trigger
language plpgsql security definer set search_path = '' as $$
declare
  v_id bigint;
begin
  update realtime.stream set last_id = last_id + 1 where id = 1 returning last_id into v_id;
  update realtime.events set id = v_id, at = clock_timestamp() where seq = new.seq;
  perform pg_notify('autodispatch_events', '');
  return null;
end
$$;
create constraint trigger bench_assign_id_at_commit after insert on realtime.events
  deferrable initially deferred
  for each row execute function realtime.bench_assign_id_at_commit();
"""
_NOT_AT_COMMIT = """
drop trigger if exists bench_assign_id_at_commit on realtime.events;
drop function if exists realtime.bench_assign_id_at_commit();
"""


def set_numbering_at_commit(url: str, on: bool) -> None:
    """Put back (or remove) the numbering inside each writer's commit, as before 0008."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(_NOT_AT_COMMIT)
        if on:
            conn.execute(_AT_COMMIT)


def set_log(url: str, on: bool) -> None:
    """Enable or disable the event log's capture triggers (the writers' only link to it)."""
    verb = "enable" if on else "disable"
    with psycopg.connect(url, autocommit=True) as conn:
        for table in CAPTURED:
            conn.execute(f"alter table public.{table} {verb} trigger a_realtime_capture")


def set_decoding(url: str, on: bool) -> None:
    """Publish the captured tables with their whole old rows and make the decoder's slot
    (or undo both): the log written from the WAL, as db/decoder.py writes it. The slot is
    made new for each decoded round, so it brings only that round's writes."""
    from autodispatch.db.capture import CAPTURED as TABLES
    from autodispatch.db.decoder import PUBLICATION, SLOT, EventDecoder
    from autodispatch.db.slot import Slot

    with psycopg.connect(url, autocommit=True) as conn:
        Slot(SLOT, PUBLICATION).drop(conn)
        for table in TABLES:
            identity = "full" if on else "default"
            conn.execute(f"alter table public.{table} replica identity {identity}")
        conn.execute(f"drop publication if exists {PUBLICATION}")
        if on:
            tables = ", ".join(f"public.{t}" for t in sorted(TABLES))
            conn.execute(f"create publication {PUBLICATION} for table {tables}")
            # The decoded log continues the ids; a new slot starts after what is there.
            conn.execute("update realtime.stream set decoded_lsn = null")
    if on:
        EventDecoder(url).ensure_slot()


def _decoder_process(url: str, ready: Any, finish: Any) -> None:
    """A decoder, as one server process runs it: rounds until told to finish."""
    from autodispatch.db.decoder import EventDecoder

    async def run() -> None:
        decoder = EventDecoder(url, wait=0.05)
        try:
            await decoder.apply_available()
            ready.set()
            while not finish.is_set():
                await decoder.apply_available()
        finally:
            await decoder.close()

    asyncio.run(run())


@contextlib.contextmanager
def decoder_running(url: str, on: bool) -> Any:
    """A decoder process for the round (when ``on``), running before the writers start."""
    if not on:
        yield
        return
    context = multiprocessing.get_context("spawn")
    ready, finish = context.Event(), context.Event()
    process = context.Process(target=_decoder_process, args=(url, ready, finish), daemon=True)
    process.start()
    try:
        while not ready.wait(0.5):
            if not process.is_alive():
                raise SystemExit(f"the bench decoder process died (exit {process.exitcode})")
        yield
    finally:
        finish.set()
        process.join(timeout=30)
