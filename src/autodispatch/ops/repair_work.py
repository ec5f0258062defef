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

from autodispatch.db import queries
from autodispatch.domain.lifecycle import ASSIGNMENT, CONSISTENT_PAIRS, SESSION
from autodispatch.ops.audit_data import STOPPED_AFTER_BEATS, STOPPED_AFTER_SECONDS
from autodispatch.ops.gateways import EXPIRY_GRACE_SECONDS
from autodispatch.ops.reconcile import missing_assignment_pair, pair_kind, settle

BATCH = 200
SAMPLE = 10  # changes listed per kind
# The bypass never waits for a lock while holding one: it gives up and tries again.
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
# The controlled bypass (docs/decisions.md, Repair): no writer may change either table while
# a repair transaction has the guard and sync triggers off. NOWAIT: the repair never waits
# holding one of them (it retries instead), so it cannot deadlock a writer. (Not a named
# query: LOCK cannot be prepared, and tests/db/test_schema.py prepares every named query.)
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

    def as_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "title": self.title,
            "found": self.found,
            "fixed": self.fixed,
            "changes": self.changes,
            "skipped": self.skipped,
        }


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
    ) -> None:
        """Page through the rows of ``query`` (keyset on ``key``); describe each (dry run)
        or fix each page (``apply``)."""
        after = first
        started = False
        while True:
            limit = self.options.batch if self.options.apply or not started else SAMPLE
            page = await self.rows(query, {**params, "after": after, "limit": limit})
            if not started:
                result.found = int(page[0]["total"]) if page else 0
                started = True
                if self.progress is not None and self.options.apply and result.found:
                    self.progress.start(result.code, result.title, result.found)
            if not page:
                return
            if not self.options.apply:
                for row in page:
                    result.note(describe(row))
                return
            await fix(page)
            if self.progress is not None:
                self.progress.advance(result.code, len(page))
            after = page[-1][key]
            if len(page) < limit:
                return

    async def transaction(self, body: Callable[[], Awaitable[None]], *, bypass: bool) -> None:
        """Run ``body`` in one transaction whose transitions have the reason ``repair``.

        ``bypass``: with the lifecycle guard and sync triggers off for this transaction
        only, both tables locked against writers (see the module docstring). Lock waits
        time out quickly and the whole transaction is retried, so a repair never holds a
        lock while waiting for another (no deadlock with a writer)."""
        for attempt in range(LOCK_ATTEMPTS):
            try:
                async with self.conn.transaction():
                    await self.conn.execute("set local lock_timeout = '500ms'")
                    await self.conn.execute(self.q["repair_because"])
                    if bypass:
                        await self.conn.execute(LOCK_TABLES)
                        off = await self.enabled_triggers(BYPASSED_TRIGGERS)
                        await self._set_triggers(off, enable=False)
                        await body()
                        await self._set_triggers(off, enable=True)
                    else:
                        await body()
                return
            except psycopg.errors.LockNotAvailable:
                if attempt == LOCK_ATTEMPTS - 1:
                    raise RepairRefused(
                        "Writers kept sessions and session_assignments busy for"
                        f" {LOCK_ATTEMPTS * LOCK_RETRY_SECONDS:.0f} s; nothing of this batch"
                        " changed. Run the repair again (it resumes where it stopped)."
                    ) from None
                await asyncio.sleep(LOCK_RETRY_SECONDS)
            except psycopg.errors.InsufficientPrivilege as exc:
                raise RepairRefused(
                    f"The repair needs to own the dispatch tables (it is run as the user that"
                    f" ran `autodispatch migrate`): {exc}"
                ) from None

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
            async def body() -> None:
                for row in page:
                    locked = await self.rows(
                        "repair_lock_session", {"session_id": row["session_id"]}
                    )
                    if not locked or await self.rows(
                        "repair_lock_assignment", {"session_id": row["session_id"]}
                    ):
                        result.skipped.append(f"session {row['session_id']}: changed meanwhile")
                        continue
                    s, a = target({**row, "session_status": locked[0]["status"]})
                    await self.count(
                        "repair_insert_assignment", {"session_id": row["session_id"], "status": a}
                    )
                    if s != locked[0]["status"]:
                        await self.count(
                            "repair_set_session",
                            {
                                "session_id": row["session_id"],
                                "status": s,
                                "from_status": locked[0]["status"],
                                "mechanic_id": None,
                            },
                        )
                    result.fixed += 1
                    result.note(describe(row))

            await self.transaction(body, bypass=True)

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
            async def body() -> None:
                for row in page:
                    sid = row["session_id"]
                    session = await self.rows("repair_lock_session", {"session_id": sid})
                    assignment = await self.rows("repair_lock_assignment", {"session_id": sid})
                    if not session or not assignment:
                        result.skipped.append(f"session {sid}: deleted meanwhile")
                        continue
                    s, a = session[0]["status"], assignment[0]["status"]
                    if (s, a) in CONSISTENT_PAIRS:
                        result.skipped.append(f"session {sid}: already consistent ({s}/{a})")
                        continue
                    mechanic = assignment[0]["mechanic_id"] or session[0]["mechanic_id"]
                    ts, ta = settle(s, a, mechanic is not None)
                    if ta != a:
                        await self.count(
                            "repair_set_assignment",
                            {
                                "assignment_id": assignment[0]["id"],
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
                    result.fixed += 1
                    result.note(describe_move(sid, s, a, mechanic is not None))

            await self.transaction(body, bypass=True)

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

        async def body() -> None:
            for row in page:
                if not await self.rows(
                    "repair_try_lock_session", {"session_id": row["session_id"]}
                ):
                    result.skipped.append(f"assignment {row['assignment_id']}: its session is busy")
                    continue
                if await self.count(statement, {**params, "assignment_id": row["assignment_id"]}):
                    result.fixed += 1
                    result.note(describe(row))
                else:
                    result.skipped.append(f"assignment {row['assignment_id']}: changed meanwhile")

        await self.transaction(body, bypass=False)

    async def stale_session_keys(self, result: KindResult) -> None:
        def describe(row: Row) -> str:
            return f"session {row['session_id']}: recompute its visibility keys"

        async def fix(page: Sequence[Row]) -> None:
            async def body() -> None:
                for row in page:
                    sid = row["session_id"]
                    if not await self.rows("repair_try_lock_session", {"session_id": sid}):
                        result.skipped.append(f"session {sid}: busy")
                        continue
                    touched = await self.rows("repair_refresh_session_keys", {"session_id": sid})
                    if not touched:
                        result.skipped.append(f"session {sid}: keys already right")
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
                    result.fixed += 1
                    result.note(describe(row))

            await self.transaction(body, bypass=False)

        await self.run_kind(
            result, "repair_stale_session_keys", {}, "session_id", NIL, describe, fix
        )

    async def events_without_id(self, result: KindResult) -> None:
        def describe(row: Row) -> str:
            what = (
                "drop it (a later event of the row supersedes it)"
                if row["superseded"]
                else ("give it the next id (delivered late)")
            )
            return f"event seq {row['seq']} ({row['table_name']} {row['row_id']}): {what}"

        async def fix(page: Sequence[Row]) -> None:
            async def body() -> None:
                assigned = False
                for row in page:
                    if row["superseded"]:
                        done = await self.count("repair_drop_event", {"seq": row["seq"]})
                    elif await self.rows("repair_lock_event", {"seq": row["seq"]}):
                        done = len(await self.rows("repair_assign_event_id", {"seq": row["seq"]}))
                        assigned = assigned or bool(done)
                    else:
                        done = 0
                    if done:
                        result.fixed += 1
                        result.note(describe(row))
                    else:
                        result.skipped.append(f"event seq {row['seq']}: changed meanwhile")
                if assigned:
                    await self.rows("repair_notify_readers")

            await self.transaction(body, bypass=False)

        await self.run_kind(result, "repair_events_without_id", {}, "seq", 0, describe, fix)

    async def stopped_gateways(self, result: KindResult) -> None:
        params = {"beats": STOPPED_AFTER_BEATS, "min_seconds": STOPPED_AFTER_SECONDS}

        def describe(row: Row) -> str:
            where = f"{row['host']}:{row['pid']}, last seen {row['seen_at']}"
            return f"gateway {row['id']} ({where}): forget it"

        async def fix(page: Sequence[Row]) -> None:
            async def body() -> None:
                for row in page:
                    if await self.count("repair_forget_gateway", {**params, "id": row["id"]}):
                        result.fixed += 1
                        result.note(describe(row))
                    else:
                        result.skipped.append(f"gateway {row['id']}: beat again meanwhile")

            await self.transaction(body, bypass=False)

        await self.run_kind(result, "repair_stopped_gateways", params, "id", NIL, describe, fix)
