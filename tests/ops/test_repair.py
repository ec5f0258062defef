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


async def test_repair_waits_for_a_writer_instead_of_deadlocking_it(
    db_url: str, tmp_path: Path
) -> None:
    """A writer holding locks on both tables delays the repair (which retries without
    holding anything); the writer commits normally, then the repair completes."""
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
            await writer.commit()  # the writer was never blocked into a deadlock
            report = await asyncio.wait_for(repairing, timeout=30)
        finally:
            await writer.close()
    assert report.remaining == 0
    assert repair_audit_rows(db_url, ids[0]) == [("assignment", "accepted", "completed")]


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
