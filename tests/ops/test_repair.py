"""`autodispatch repair`: a dry run changes nothing; --apply fixes in pages, idempotently,
with audit rows, refuses when it could not leave them, and never deadlocks a writer."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import psycopg
import pytest
from ops_helpers import (
    audit,
    behind_our_back,
    every_kind_of_session,
    repair_audit_rows,
    run_repair,
    running_world,
    sql,
)

from autodispatch.ops.repair import RepairRefused


async def completed_behind_our_back(db_url: str, tmp_path: Path, n: int) -> list[str]:
    """``n`` accepted requests whose sessions were then completed with the triggers off."""
    async with running_world(db_url, tmp_path) as world:
        ids = []
        for _ in range(n):
            q = await world.queued()
            r = await world.client.post(
                f"/api/assignments/{q['assignment']['id']}/accept", headers=world.mechanic.headers
            )
            assert r.status_code == 200, r.text
            ids.append(q["session"]["id"])
    behind_our_back(
        db_url, "update sessions set status = 'completed' where id = any(%s::uuid[])", params=(ids,)
    )
    return ids


def statuses(db_url: str) -> list[tuple[Any, ...]]:
    return sql(
        db_url,
        "select s.id, s.status, a.status from sessions s join session_assignments a"
        " on a.session_id = s.id order by s.id",
    )


async def test_a_dry_run_says_what_it_would_change_and_changes_nothing(
    db_url: str, tmp_path: Path
) -> None:
    """Without --apply the repair lists each change and leaves the database as it was."""
    ids = await completed_behind_our_back(db_url, tmp_path, 2)
    before = statuses(db_url)
    audit_rows = sql(db_url, "select count(*) from lifecycle_audit")

    report = await run_repair(db_url, apply=False)
    assert not report.applied and report.found == 2 and report.remaining == 2
    pairs = next(k for k in report.kinds if k.code == "inconsistent_pair")
    assert len(pairs.changes) == 2
    for sid in ids:
        assert any(
            change.startswith(f"session {sid} (completed/accepted")
            and "assignment accepted → completed" in change
            for change in pairs.changes
        )
    assert statuses(db_url) == before
    assert sql(db_url, "select count(*) from lifecycle_audit") == audit_rows


async def test_apply_works_in_pages_reports_progress_and_is_idempotent(
    db_url: str, tmp_path: Path
) -> None:
    """Five broken pairs in pages of two: all fixed, progress reported, a second run finds
    nothing, and each pair has exactly one repair audit row."""
    ids = await completed_behind_our_back(db_url, tmp_path, 5)

    class Seen:
        def __init__(self) -> None:
            self.started: list[tuple[str, int]] = []
            self.advanced = 0

        def start(self, code: str, title: str, total: int) -> None:
            self.started.append((code, total))

        def advance(self, code: str, n: int) -> None:
            self.advanced += n

    seen = Seen()
    from autodispatch.ops.repair import RepairOptions, repair

    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        report = await repair(conn, RepairOptions(apply=True, batch=2), seen)
    assert (report.found, report.remaining) == (5, 0)
    assert seen.started == [("inconsistent_pair", 5)] and seen.advanced == 5
    for sid in ids:
        assert repair_audit_rows(db_url, sid) == [("assignment", "accepted", "completed")]
    again = await run_repair(db_url)
    assert again.found == 0
    for sid in ids:
        assert len(repair_audit_rows(db_url, sid)) == 1
    assert (await audit(db_url)).ok


async def test_repair_refuses_when_it_could_not_leave_audit_rows(
    db_url: str, tmp_path: Path
) -> None:
    """With the audit trigger disabled, --apply changes nothing and says why."""
    await completed_behind_our_back(db_url, tmp_path, 1)
    before = statuses(db_url)
    sql(db_url, "alter table session_assignments disable trigger session_assignments_audit")
    with pytest.raises(RepairRefused, match=r"session_assignments\.session_assignments_audit"):
        await run_repair(db_url)
    assert statuses(db_url) == before
    assert (await run_repair(db_url, apply=False)).found == 1  # a dry run still reports


async def test_the_bypass_is_confined_to_the_repair_transaction(
    db_url: str, tmp_path: Path
) -> None:
    """After a repair the guard and sync triggers are enabled again, and a failure inside a
    repair transaction rolls the trigger state back with everything else."""
    await completed_behind_our_back(db_url, tmp_path, 1)
    await run_repair(db_url)
    enabled_query = (
        "select tgname, tgenabled::text from pg_trigger where tgname in"
        " ('sessions_guard', 'sessions_sync_assignment', 'session_assignments_guard',"
        " 'session_assignments_sync_session') order by tgname"
    )
    enabled = sql(db_url, enabled_query)
    assert [e for _, e in enabled] == ["O"] * 4

    # A repair that fails half-way (a constraint refuses its change) rolls back whole:
    # the triggers it turned off are on again, nothing else changed.
    await completed_behind_our_back(db_url, tmp_path, 1)
    before = statuses(db_url)
    sql(
        db_url,
        "alter table session_assignments add constraint no_completed"
        " check (status <> 'completed') not valid",
    )
    with pytest.raises(psycopg.errors.CheckViolation):
        await run_repair(db_url)
    assert sql(db_url, enabled_query) == enabled
    assert statuses(db_url) == before


async def blocked_or_done(db_url: str, writer: psycopg.AsyncConnection[Any], task: Any) -> bool:
    """Wait until ``task`` (a statement on ``writer``) finished or waits for a lock; True
    when it waits."""
    pid = writer.info.backend_pid
    for _ in range(250):
        if task.done():
            return False
        waiting = sql(
            db_url, "select wait_event_type = 'Lock' from pg_stat_activity where pid = %s", (pid,)
        )
        if waiting and waiting[0][0]:
            return True
        await asyncio.sleep(0.02)
    raise AssertionError("the writer neither finished nor waited for a lock")


def pause_when_locking(monkeypatch: pytest.MonkeyPatch, session_id: str) -> tuple[Any, Any]:
    """Make the repair stop just before it locks ``session_id``'s row: (reached, resume)."""
    from autodispatch.ops.repair_work import Repairer

    reached, resume = asyncio.Event(), asyncio.Event()
    rows = Repairer.rows

    async def rows_pausing(self: Repairer, name: str, params: Any = None) -> Any:
        if (
            name == "repair_lock_session"
            and str((params or {}).get("session_id")) == session_id
            and not reached.is_set()
        ):
            reached.set()
            await resume.wait()
        return await rows(self, name, params)

    monkeypatch.setattr(Repairer, "rows", rows_pausing)
    return reached, resume


async def test_a_writer_holding_a_broken_session_is_never_deadlocked(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer holds a broken session's row (select ... for update, as every api.*
    writer starts) and then updates its assignment just as the repair reaches that
    session: the writer commits (no deadlock, not held up), and the repair leaves the row
    alone or fixes it after; a second run fixes it."""
    (sid,) = await completed_behind_our_back(db_url, tmp_path, 1)
    aid = sql(db_url, "select id from session_assignments where session_id = %s", (sid,))[0][0]
    reached, resume = pause_when_locking(monkeypatch, sid)
    writer = await psycopg.AsyncConnection.connect(db_url)
    try:
        await writer.execute("select 1 from sessions where id = %s for update", (sid,))
        repairing = asyncio.create_task(run_repair(db_url))
        await asyncio.wait_for(reached.wait(), timeout=10)
        update = asyncio.create_task(
            writer.execute(
                "update session_assignments set request_summary = request_summary"
                ' || \'{"note": "writer"}\' where id = %s',
                (aid,),
            )
        )
        if await blocked_or_done(db_url, writer, update):
            # The writer waits for something the repair holds. Let the repair go on once
            # the writer has waited longer than the repair's lock_timeout would allow,
            # but not yet deadlock_timeout (1 s): if the repair now waits for the
            # writer's row, PostgreSQL finds the cycle from the writer's side and aborts
            # the writer.
            await asyncio.sleep(0.7)
        resume.set()
        await asyncio.wait_for(update, timeout=10)  # DeadlockDetected here before the fix
        await writer.commit()
        report = await asyncio.wait_for(repairing, timeout=30)
    finally:
        resume.set()
        await writer.close()
    pairs = next(k for k in report.kinds if k.code == "inconsistent_pair")
    assert (pairs.found, pairs.fixed + len(pairs.skipped)) == (1, 1)
    assert report.remaining == len(pairs.skipped)
    if pairs.skipped:
        assert pairs.skipped == [f"session {sid}: busy (a writer holds it; run the repair again)"]
        assert (await run_repair(db_url)).remaining == 0
    assert repair_audit_rows(db_url, sid) == [("assignment", "accepted", "completed")]
    summary = sql(
        db_url, "select request_summary->>'note' from session_assignments where id = %s", (aid,)
    )
    assert summary == [("writer",)]  # the writer's change stands
    assert (await audit(db_url)).ok


async def test_the_repair_retries_while_a_writer_has_written(db_url: str, tmp_path: Path) -> None:
    """A writer that has written to session_assignments (and not committed) keeps the
    repair from lifting the guard; the repair retries without holding anything and
    finishes once the writer commits, which it does normally."""
    ids = await completed_behind_our_back(db_url, tmp_path, 1)
    async with running_world(db_url, tmp_path) as world:
        other = await world.queued()
        writer = await psycopg.AsyncConnection.connect(db_url)
        try:
            await writer.execute(
                "select 1 from sessions where id = %s for update", (other["session"]["id"],)
            )
            await writer.execute(
                "update session_assignments set request_summary = request_summary where id = %s",
                (other["assignment"]["id"],),
            )
            repairing = asyncio.create_task(run_repair(db_url))
            await asyncio.sleep(1.0)
            assert not repairing.done()  # it waits for the writer
            await writer.execute(
                "update sessions set updated_at = now() where id = %s", (other["session"]["id"],)
            )
            await writer.commit()
            report = await asyncio.wait_for(repairing, timeout=30)
        finally:
            await writer.close()
    assert report.remaining == 0
    assert repair_audit_rows(db_url, ids[0]) == [("assignment", "accepted", "completed")]


async def test_a_batch_tried_again_counts_each_row_once(db_url: str, tmp_path: Path) -> None:
    """Attempts that rolled back leave nothing in the report: with one row busy and the
    batch retried while another writer is mid-transaction, the repair reports one fix,
    the busy row left alone once, and nothing negative."""
    low, high = sorted(await completed_behind_our_back(db_url, tmp_path, 2))
    async with running_world(db_url, tmp_path) as world:
        other = await world.queued()
    holder = await psycopg.AsyncConnection.connect(db_url)  # holds the second broken session
    busy = await psycopg.AsyncConnection.connect(db_url)  # has written, not committed
    try:
        await holder.execute("select 1 from sessions where id = %s for update", (high,))
        await busy.execute(
            "update session_assignments set request_summary = request_summary where id = %s",
            (other["assignment"]["id"],),
        )
        repairing = asyncio.create_task(run_repair(db_url))
        await asyncio.sleep(1.0)  # attempts fail and roll back meanwhile
        await busy.commit()
        await asyncio.sleep(1.5)
        await holder.commit()
        report = await asyncio.wait_for(repairing, timeout=30)
    finally:
        await holder.close()
        await busy.close()
    pairs = next(k for k in report.kinds if k.code == "inconsistent_pair")
    assert (pairs.found, pairs.fixed) == (2, 1), pairs.as_json()
    assert pairs.skipped == [f"session {high}: busy (a writer holds it; run the repair again)"]
    assert report.remaining == 1 and report.as_json()["remaining"] == 1
    assert len(pairs.changes) == 1 and pairs.changes[0].startswith(f"session {low} ")
    assert repair_audit_rows(db_url, low) == [("assignment", "accepted", "completed")]
    again = await run_repair(db_url)
    assert (again.found, again.remaining) == (1, 0)
    assert (await audit(db_url)).ok


async def test_every_kind_together_on_a_busy_database(db_url: str, tmp_path: Path) -> None:
    """Several kinds of damage at once, repaired while a server runs: audit is clean after."""
    async with running_world(db_url, tmp_path) as world:
        made = await every_kind_of_session(world)
        behind_our_back(
            db_url,
            "update sessions set status = 'completed' where id ="
            f" '{made['live']['session']['id']}'",
            "update sessions set status = 'cancelled' where id ="
            f" '{made['queued']['session']['id']}'",
            "delete from session_assignments where session_id ="
            f" '{made['paid_queued']['session']['id']}'",
            "update session_assignments set status = 'accepted', offered_to = null,"
            f" offer_expires_at = null, mechanic_id = '{world.mechanic.mechanic_id}'"
            f" where id = '{made['offered']['assignment']['id']}'",
        )
        before = await audit(db_url)
        assert before.codes() >= {
            "ended_session_open_assignment",
            "session_without_assignment",
            "accepted_assignment_session_pending",
        }
        report = await run_repair(db_url)
        assert report.remaining == 0
        after = await audit(db_url)
        assert after.ok, [f.as_json() for f in after.findings]
        assert made["queued"]["assignment"]["id"] not in await world.queue_ids(world.mechanic)
