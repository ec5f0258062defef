"""How `autodispatch repair` changes rows: pages of candidates, one short transaction per
page, each row re-read and locked first; and the controlled bypass of the lifecycle guard
(see ``ops.repair`` and docs/decisions.md, Repair). The repair of each kind of finding is
in ``ops.repair_kinds``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row

from autodispatch.db import queries

# Bypass transactions keep writers of both tables waiting until they commit: keep them tiny.
BATCH = 20
SAMPLE = 10  # changes listed per kind
# The repair never waits for a row a writer holds (SKIP LOCKED), nor for the table locks
# of the bypass (NOWAIT); any other lock it waits for briefly, then the whole batch rolls
# back and is tried again, up to LOCK_ATTEMPTS times.
LOCK_TIMEOUT = "200ms"
LOCK_ATTEMPTS = 60
LOCK_RETRY_SECONDS = 0.25
# Triggers the pair repairs turn off in their own transaction (everything else stays on).
BYPASSED_TRIGGERS = (
    ("sessions", "sessions_guard"),
    ("sessions", "sessions_sync_assignment"),
    ("session_assignments", "session_assignments_guard"),
    ("session_assignments", "session_assignments_sync_session"),
)
AUDIT_TRIGGERS = (
    ("sessions", "sessions_audit"),
    ("session_assignments", "session_assignments_audit"),
)
NIL = uuid.UUID(int=0)
# The controlled bypass (docs/decisions.md, Repair). Taken only once the batch's rows are
# locked (session first, then assignment, as every writer does, and without waiting), and
# NOWAIT: the repair never waits for it. While the repair holds it, a writer's UPDATE of
# either table waits for the repair's commit (a few milliseconds: every lock the repair
# still needs is already its own), so no other transaction runs while the guard is off.
# (Not a named query: LOCK cannot be prepared, and tests/db/test_schema.py prepares every
# named query.)
LOCK_TABLES = sql.SQL(
    "lock table public.sessions, public.session_assignments in share row exclusive mode nowait"
)


class RepairRefused(Exception):
    """The database is not in a state a repair may touch; the message says why and what to do."""


class Progress(Protocol):
    def start(self, code: str, title: str, total: int) -> None: ...

    def advance(self, code: str, n: int) -> None: ...


@dataclass
class KindResult:
    code: str
    title: str
    found: int = 0
    fixed: int = 0
    changes: list[str] = field(default_factory=list)  # the first SAMPLE, for people
    skipped: list[str] = field(default_factory=list)  # rows left alone, and why

    def note(self, change: str) -> None:
        if len(self.changes) < SAMPLE:
            self.changes.append(change)

    def merge(self, tally: Tally) -> None:
        """Add what a committed batch did."""
        self.fixed += tally.fixed
        for change in tally.changes:
            self.note(change)
        self.skipped += tally.skipped

    def as_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "title": self.title,
            "found": self.found,
            "fixed": self.fixed,
            "changes": self.changes,
            "skipped": self.skipped,
        }


@dataclass
class Tally:
    """What one attempt at a batch did. A batch that rolls back (and is tried again) did
    nothing: its tally is dropped, and only the committed attempt's counts."""

    fixed: int = 0
    changes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def fixed_one(self, change: str) -> None:
        self.fixed += 1
        self.changes.append(change)

    def skip(self, why: str) -> None:
        self.skipped.append(why)


@dataclass(frozen=True)
class RepairOptions:
    apply: bool = False
    request_ttl_seconds: int = 30 * 60
    batch: int = BATCH


Row = Mapping[str, Any]


class Repairer:
    def __init__(
        self, conn: psycopg.AsyncConnection[Any], options: RepairOptions, progress: Progress | None
    ) -> None:
        self.conn = conn
        self.options = options
        self.progress = progress
        self.q = queries.load()
        self._bypassed: list[tuple[str, str]] = []  # triggers this transaction turned off

    async def rows(self, name: str, params: Mapping[str, Any] | None = None) -> list[DictRow]:
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(self.q[name], params or {})
            return await cur.fetchall() if cur.description else []

    async def count(self, name: str, params: Mapping[str, Any] | None = None) -> int:
        async with self.conn.cursor() as cur:
            await cur.execute(self.q[name], params or {})
            return cur.rowcount

    # -- the loop every kind shares -------------------------------------------------

    async def run_kind(
        self,
        result: KindResult,
        query: str,
        params: Mapping[str, Any],
        key: str,
        first: Any,
        describe: Callable[[Row], str],
        fix: Callable[[Sequence[Row]], Awaitable[None]],
        size: Callable[[Row], int] = lambda row: 1,
    ) -> None:
        """Page through the rows of ``query`` (keyset on ``key``); describe each (dry run)
        or fix each page (``apply``). ``size``: how many found items a row stands for.

        A dry run's ``found`` is the count of the first page's query. With ``apply`` that
        count only sizes the progress bar: ``found`` becomes what the pages held, each of
        which the fix either fixed or left alone (with the reason), so ``found - fixed``
        is exactly what was left alone, even when the database changed meanwhile."""
        page = await self.rows(query, {**params, "after": first, "limit": self.options.batch})
        result.found = int(page[0]["total"]) if page else 0
        if not self.options.apply:
            for row in page:
                result.note(describe(row))
            return
        if self.progress is not None and result.found:
            self.progress.start(result.code, result.title, result.found)
        visited = 0
        while page:
            await fix(page)
            done = sum(size(row) for row in page)
            visited += done
            if self.progress is not None:
                self.progress.advance(result.code, done)
            if len(page) < self.options.batch:
                break
            after = page[-1][key]
            page = await self.rows(query, {**params, "after": after, "limit": self.options.batch})
        result.found = visited

    async def transaction(
        self, result: KindResult, body: Callable[[Tally], Awaitable[None]]
    ) -> None:
        """Run ``body`` in one transaction whose transitions have the reason ``repair``, and
        add what it did to ``result`` once it committed.

        The repair never holds a lock while it waits for a writer: rows are taken with SKIP
        LOCKED (a busy row is left for the next run), the bypass's table locks with NOWAIT,
        anything else waits at most LOCK_TIMEOUT. When a lock is not available the whole
        attempt rolls back (its tally with it) and is tried again a little later."""
        for attempt in range(LOCK_ATTEMPTS):
            tally = Tally()
            try:
                async with self.conn.transaction():
                    await self.conn.execute(f"set local lock_timeout = '{LOCK_TIMEOUT}'")
                    await self.conn.execute(self.q["repair_because"])
                    self._bypassed = []
                    await body(tally)
                    await self._set_triggers(self._bypassed, enable=True)
            except psycopg.errors.LockNotAvailable:
                if attempt == LOCK_ATTEMPTS - 1:
                    raise RepairRefused(
                        "Writers kept the rows or tables of this repair busy for"
                        f" {LOCK_ATTEMPTS * LOCK_RETRY_SECONDS:.0f} s; nothing of this batch"
                        " changed. Run the repair again (it resumes where it stopped)."
                    ) from None
                await asyncio.sleep(LOCK_RETRY_SECONDS)
                continue
            except psycopg.errors.InsufficientPrivilege as exc:
                raise RepairRefused(
                    f"The repair needs to own the dispatch tables (it is run as the user that"
                    f" ran `autodispatch migrate`): {exc}"
                ) from None
            result.merge(tally)
            return

    async def lift_guard(self) -> None:
        """Lock both tables against writers (NOWAIT) and turn the guard and sync triggers
        off until the end of this transaction (``transaction`` turns them on again; a
        rollback restores them with everything else). Call it only once every row the
        batch changes is locked: from here on the repair must not wait for a writer."""
        await self.conn.execute(LOCK_TABLES)
        self._bypassed = await self.enabled_triggers(BYPASSED_TRIGGERS)
        await self._set_triggers(self._bypassed, enable=False)

    async def lock_pair(
        self, tally: Tally, session_id: Any, *, assignment_expected: bool = True
    ) -> tuple[Row, Row | None] | None:
        """Lock a session, then its assignment (when it should have one), in the writers'
        order but without waiting: None, with the reason in the tally, when either is busy
        or not as expected."""
        session = await self.rows("repair_lock_session", {"session_id": session_id})
        assignment = []
        if session and assignment_expected:
            assignment = await self.rows("repair_lock_assignment", {"session_id": session_id})
            if assignment:
                return session[0], assignment[0]
        exists = (await self.rows("repair_pair_exists", {"session_id": session_id}))[0]
        if session and not assignment_expected and not exists["assignment"]:
            return session[0], None
        if not exists["session"]:
            tally.skip(f"session {session_id}: deleted meanwhile")
        elif not session or (assignment_expected and exists["assignment"]):
            tally.skip(f"session {session_id}: busy (a writer holds it; run the repair again)")
        elif assignment_expected:
            tally.skip(f"session {session_id}: its assignment was deleted meanwhile")
        else:
            tally.skip(f"session {session_id}: has an assignment now")
        return None

    async def enabled_triggers(self, wanted: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        present = {
            (r["table_name"], r["trigger_name"]): r["enabled"]
            for r in await self.rows("repair_lifecycle_triggers")
        }
        return [t for t in wanted if present.get(t) in ("O", "A")]

    async def _set_triggers(self, triggers: Sequence[tuple[str, str]], *, enable: bool) -> None:
        verb = sql.SQL("enable" if enable else "disable")
        for table, trigger in triggers:
            await self.conn.execute(
                sql.SQL("alter table {} {} trigger {}").format(
                    sql.Identifier("public", table), verb, sql.Identifier(trigger)
                )
            )

    # -- the kinds --------------------------------------------------------------------
