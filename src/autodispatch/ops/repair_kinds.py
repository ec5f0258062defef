"""The repairs themselves, one method per kind of finding `autodispatch repair` fixes (the
names ``ops.repair.KINDS`` lists), each on ``Repairer``'s pages, transactions and locks
(``ops.repair_work``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from autodispatch.config import EXPIRY_GRACE_SECONDS, SEQUENCE_GRACE_SECONDS
from autodispatch.domain.lifecycle import ASSIGNMENT, CONSISTENT_PAIRS, SESSION
from autodispatch.ops.reconcile import missing_assignment_pair, pair_kind, settle
from autodispatch.ops.repair_work import NIL, KindResult, Repairer, Row, Tally


class Repairs(Repairer):
    """``Repairer`` with the repair of each kind."""

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
