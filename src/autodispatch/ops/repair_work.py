"""How `autodispatch repair` changes rows: pages of candidates, one short transaction per
page, each row re-read and locked first; and the controlled bypass of the lifecycle guard
(see ``ops.repair`` and docs/decisions.md, Repair)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row

from autodispatch.config import EXPIRY_GRACE_SECONDS, SEQUENCE_GRACE_SECONDS
from autodispatch.db import queries
from autodispatch.domain.lifecycle import ASSIGNMENT, CONSISTENT_PAIRS, SESSION
from autodispatch.ops.reconcile import missing_assignment_pair, pair_kind, settle

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

    async def sessions_without_assignment(self, result: KindResult) -> None:
        def target(row: Row) -> tuple[str, str]:
            return missing_assignment_pair(
                row["session_status"], bool(row["ready_to_queue"]), row["mechanic_id"] is not None
            )

        def describe(row: Row) -> str:
            s, a = target(row)
            moved = "" if s == row["session_status"] else f"; session {row['session_status']} → {s}"
            return f"session {row['session_id']}: create its assignment as {a}{moved}"

        async def fix(page: Sequence[Row]) -> None:
            async def body(tally: Tally) -> None:
                locked = []
                for row in page:
                    pair = await self.lock_pair(tally, row["session_id"], assignment_expected=False)
                    if pair is not None:
                        locked.append((row, pair[0]))
                if not locked:
                    return
                await self.lift_guard()
                for row, session in locked:
                    now = {**row, "session_status": session["status"]}
                    s, a = target(now)
                    if not await self.count(
                        "repair_insert_assignment", {"session_id": row["session_id"], "status": a}
                    ):
                        tally.skip(f"session {row['session_id']}: has an assignment now")
                        continue
                    if s != session["status"]:
                        await self.count(
                            "repair_set_session",
                            {
                                "session_id": row["session_id"],
                                "status": s,
                                "from_status": session["status"],
                                "mechanic_id": None,
                            },
                        )
                    tally.fixed_one(describe(now))

            await self.transaction(result, body)

        await self.run_kind(
            result, "repair_sessions_without_assignment", {}, "session_id", NIL, describe, fix
        )

    async def pairs(self, result: KindResult) -> None:
        consistent = sorted(CONSISTENT_PAIRS)
        params = {
            "session_states": sorted(SESSION.states),
            "assignment_states": sorted(ASSIGNMENT.states),
            "consistent_sessions": [s for s, _ in consistent],
            "consistent_assignments": [a for _, a in consistent],
        }

        def describe_move(session_id: Any, s: str, a: str, mechanic: bool) -> str:
            ts, ta = settle(s, a, mechanic)
            moves = []
            if ta != a:
                moves.append(f"assignment {a} → {ta}")
            if ts != s:
                moves.append(f"session {s} → {ts}")
            return f"session {session_id} ({s}/{a}, {pair_kind(s, a)}): {', '.join(moves)}"

        def describe(row: Row) -> str:
            return describe_move(
                row["session_id"],
                row["session_status"],
                row["assignment_status"],
                row["mechanic_id"] is not None,
            )

        async def fix(page: Sequence[Row]) -> None:
            async def body(tally: Tally) -> None:
                locked = []
                for row in page:
                    sid = row["session_id"]
                    pair = await self.lock_pair(tally, sid)
                    if pair is None:
                        continue
                    session, assignment = pair
                    assert assignment is not None
                    s, a = session["status"], assignment["status"]
                    if (s, a) in CONSISTENT_PAIRS:
                        tally.skip(f"session {sid}: already consistent ({s}/{a})")
                        continue
                    locked.append((sid, session, assignment))
                if not locked:
                    return
                await self.lift_guard()
                for sid, session, assignment in locked:
                    s, a = session["status"], assignment["status"]
                    mechanic = assignment["mechanic_id"] or session["mechanic_id"]
                    ts, ta = settle(s, a, mechanic is not None)
                    if ta != a:
                        await self.count(
                            "repair_set_assignment",
                            {
                                "assignment_id": assignment["id"],
                                "status": ta,
                                "from_status": a,
                                "mechanic_id": mechanic,
                            },
                        )
                    if ts != s:
                        await self.count(
                            "repair_set_session",
                            {
                                "session_id": sid,
                                "status": ts,
                                "from_status": s,
                                "mechanic_id": mechanic,
                            },
                        )
                    tally.fixed_one(describe_move(sid, s, a, mechanic is not None))

            await self.transaction(result, body)

        await self.run_kind(
            result, "repair_inconsistent_pairs", params, "session_id", NIL, describe, fix
        )

    async def requests_past_ttl(self, result: KindResult) -> None:
        params = {
            "request_ttl_seconds": self.options.request_ttl_seconds,
            "grace_seconds": EXPIRY_GRACE_SECONDS,
        }

        def describe(row: Row) -> str:
            return (
                f"assignment {row['assignment_id']} (queued since {row['queued_at']}):"
                " queued → expired, its session cancelled"
            )

        async def fix(page: Sequence[Row]) -> None:
            await self._one_move_each(result, page, "repair_expire_request", params, describe)

        await self.run_kind(
            result, "repair_requests_past_ttl", params, "assignment_id", NIL, describe, fix
        )

    async def offers_past_expiry(self, result: KindResult) -> None:
        params = {"grace_seconds": EXPIRY_GRACE_SECONDS}

        def describe(row: Row) -> str:
            return (
                f"assignment {row['assignment_id']} (offered to {row['offered_to']}):"
                " offered → queued"
            )

        async def fix(page: Sequence[Row]) -> None:
            await self._one_move_each(result, page, "repair_return_offer", params, describe)

        await self.run_kind(
            result, "repair_offers_past_expiry", params, "assignment_id", NIL, describe, fix
        )

    async def _one_move_each(
        self,
        result: KindResult,
        page: Sequence[Row],
        statement: str,
        params: Mapping[str, Any],
        describe: Callable[[Row], str],
    ) -> None:
        """An allowed move per row, through the guard, the session locked first."""

        async def body(tally: Tally) -> None:
            for row in page:
                if not await self.rows("repair_lock_session", {"session_id": row["session_id"]}):
                    tally.skip(f"assignment {row['assignment_id']}: its session is busy or gone")
                    continue
                if await self.count(statement, {**params, "assignment_id": row["assignment_id"]}):
                    tally.fixed_one(describe(row))
                else:
                    tally.skip(f"assignment {row['assignment_id']}: changed meanwhile")

        await self.transaction(result, body)

    async def stale_session_keys(self, result: KindResult) -> None:
        def describe(row: Row) -> str:
            return f"session {row['session_id']}: recompute its visibility keys"

        async def fix(page: Sequence[Row]) -> None:
            async def body(tally: Tally) -> None:
                for row in page:
                    sid = row["session_id"]
                    if not await self.rows("repair_lock_session", {"session_id": sid}):
                        tally.skip(f"session {sid}: busy or gone")
                        continue
                    touched = await self.rows("repair_refresh_session_keys", {"session_id": sid})
                    if not touched:
                        tally.skip(f"session {sid}: keys already right")
                        continue
                    await self.count(
                        "repair_note",
                        {
                            "entity": "session",
                            "entity_id": sid,
                            "session_id": sid,
                            "status": touched[0]["status"],
                        },
                    )
                    tally.fixed_one(describe(row))

            await self.transaction(result, body)

        await self.run_kind(
            result, "repair_stale_session_keys", {}, "session_id", NIL, describe, fix
        )

    async def events_without_id(self, result: KindResult) -> None:
        """Events no server gave an id: give them theirs, in order, as a server's sequencer
        does (realtime.sequence, migration 0008), after every delivered event."""

        def describe(row: Row) -> str:
            return (
                f"{row['table_name']} {row['row_id']}: event {row['seq']} ({row['type']},"
                f" written {row['at']}): give it the next id"
            )

        async def fix(page: Sequence[Row]) -> None:
            async def body(tally: Tally) -> None:
                # The oldest events without an id get theirs: these, unless a server
                # numbered them meanwhile (then newer ones: the count is what was done).
                (done,) = await self.rows("repair_sequence_events", {"limit": len(page)})
                assigned = int(done["assigned"])
                tally.fixed += assigned
                tally.changes.append(
                    f"{assigned} events given their ids, through event {done['last_id']}"
                )

            await self.transaction(result, body)

        await self.run_kind(
            result,
            "repair_events_without_id",
            {"grace": SEQUENCE_GRACE_SECONDS},
            "seq",
            0,
            describe,
            fix,
        )

    async def stopped_gateways(self, result: KindResult) -> None:
        def describe(row: Row) -> str:
            where = f"{row['host']}:{row['pid']}, last seen {row['seen_at']}"
            return f"gateway {row['id']} ({where}): forget it"

        async def fix(page: Sequence[Row]) -> None:
            async def body(tally: Tally) -> None:
                for row in page:
                    if await self.count("repair_forget_gateway", {"id": row["id"]}):
                        tally.fixed_one(describe(row))
                    else:
                        tally.skip(f"gateway {row['id']}: beat again meanwhile")

            await self.transaction(result, body)

        await self.run_kind(result, "repair_stopped_gateways", {}, "id", NIL, describe, fix)
