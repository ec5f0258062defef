"""The per-subscriber SQL router: the hosted realtime service's method, kept as a baseline.

``autodispatch bench realtime`` measures the key router against it. For every event the
reader reads, this router asks PostgreSQL, once per subscriber of the event's table,
whether that subscriber may see the row: the subscriber's claims are set as the request's
(``request.jwt.claims``, role ``authenticated``), and the table's row-level security
predicate is evaluated on the event's new and old row versions. That is what the hosted
service does (one query per subscriber per change, run one after another), so the
database's work per event grows with the number of subscribers.

It is not a worse rule, only a slower one: the queries are the RLS predicates, evaluated
on the row versions the event carries (not on the row as it is now, which may have moved
on), so it delivers exactly what the key router delivers; ``tests/realtime/
test_baseline_router.py`` checks that. Selected with
``AUTODISPATCH_REALTIME_ROUTING=per_subscriber_sql``; never the default.

The SQL is here rather than in ``db/sql``: it exists only for this baseline.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from autodispatch.db.database import Database
from autodispatch.realtime.events import Event
from autodispatch.realtime.metrics import RealtimeMetrics
from autodispatch.realtime.router import Decision, Part, Router, Subscription, decide_bindings

# One statement per subscriber. The claims are set in a materialized CTE, so they are in
# place before the outer select (and the RLS predicate in it) is evaluated.
_CHECK = """/* autodispatch baseline: per-subscriber visibility */
with claims as materialized (
  select set_config('request.jwt.claims', %(claims)s, true) as claims
)
select {new} as new_visible, {old} as old_visible from claims"""

# Each table's RLS predicate (migrations 0001/0002) on one row version, given as JSON.
# A session's visibility_keys column is not in the event's record; the event keeps it
# as new_keys/old_keys, and it is put back into the row before the predicate runs.
_PREDICATE = {
    "session_assignments": (
        "coalesce(public.assignment_visibility_keys("
        "jsonb_populate_record(null::public.session_assignments, %({v})s::jsonb))"
        " && (select auth.principal_keys()), false)"
    ),
    "sessions": (
        "coalesce(public.session_visibility_keys("
        "jsonb_populate_record(null::public.sessions, %({v})s::jsonb))"
        " && (select auth.principal_keys()), false)"
    ),
    "feature_flags": "true",  # policy feature_flags_visible: using (true)
    "session_messages": (
        "coalesce(public.message_visibility_keys("
        "jsonb_populate_record(null::public.session_messages, %({v})s::jsonb))"
        " && (select auth.principal_keys()), false)"
    ),
    "probe_pings": (
        "coalesce(public.probe_visibility_keys("
        "jsonb_populate_record(null::public.probe_pings, %({v})s::jsonb))"
        " && (select auth.principal_keys()), false)"
    ),
}


def _check_sql(table: str) -> str:
    predicate = _PREDICATE[table]

    def version(v: str) -> str:
        return f"(%({v})s::jsonb is not null and {predicate.format(v=v)})"

    return _CHECK.format(new=version("new"), old=version("old"))


CHECK_SQL = {table: _check_sql(table) for table in _PREDICATE}


def _identity(keys: frozenset[str]) -> tuple[str, str]:
    """The database role and the claims of the principal holding ``keys``.

    Every signed-in principal holds ``user:<its id>`` (``auth.principal_keys_for``), and the
    RLS functions read nothing of the claims but ``sub``; no ``user:`` key means anon.
    """
    for key in keys:
        if key.startswith("user:"):
            return "authenticated", json.dumps({"sub": key[5:], "role": "authenticated"})
    return "anon", json.dumps({"role": "anon"})


def _row_json(event: Event, record: dict[str, Any] | None, keys: frozenset[str]) -> str | None:
    if record is None:
        return None
    if event.table in ("sessions", "session_messages"):
        record = {**record, "visibility_keys": sorted(keys)}
    return json.dumps(record, default=str)


def decide_visible(
    sub: Subscription,
    event: Event,
    new_visible: bool,
    old_visible: bool,
    types: Mapping[str, Mapping[str, str]],
) -> Decision:
    """``router.decide`` with visibility answered by SQL instead of by keys."""
    if event.table not in sub.tables:
        return Decision(False, "table_not_subscribed")
    if not (new_visible or old_visible):
        return Decision(False, "not_visible")
    table_types = types.get(event.table, {})
    return decide_bindings(
        sub, event, lambda f: event.variant_given(new_visible, old_visible, f, table_types)
    )


class PerSubscriberSqlRouter:
    """Routes each event with one SQL visibility query per subscriber of its table."""

    def __init__(
        self,
        db: Database,
        router: Router,
        metrics: RealtimeMetrics,
        wait_seconds: Callable[[], float],
    ) -> None:
        self.db = db
        self.router = router  # its subscriptions, column types and replay buffers
        self.metrics = metrics
        self.wait_seconds = wait_seconds  # the reader's slow_consumer_seconds

    async def route(self, event: Event) -> dict[str, int]:
        outcomes: dict[str, int] = defaultdict(int)
        # Every subscriber of the table is a candidate: there is no index to narrow them.
        candidates: list[Subscription] = []
        for sub in list(self.router.subscriptions):
            if event.table not in sub.tables:
                continue
            if sub.buffering:
                sub.buffer.append(event)
                outcomes["buffered"] += 1
            elif event.id <= sub.cursor:
                outcomes["duplicate"] += 1
            else:
                candidates.append(sub)
        if not candidates:
            return outcomes
        # Subscriptions of one principal share its answer, as the hosted service groups
        # subscriptions by claims.
        identities = {sub: _identity(sub.keys) for sub in candidates}
        answers = await self._visible(event, set(identities.values()))
        blocked: list[tuple[Subscription, tuple[Part, ...]]] = []
        for sub in candidates:
            if sub not in self.router.subscriptions:
                continue  # left while we asked
            new_visible, old_visible = answers[identities[sub]]
            decision = decide_visible(sub, event, new_visible, old_visible, self.router.types)
            if not decision.delivered:
                sub.cursor = event.id
                outcomes[decision.reason] += 1
                continue
            # One frame per part, the cursor moved when all are queued (Router.offer).
            if self.router.offer(sub, event, decision.parts):
                outcomes["delivered"] += 1
            else:
                blocked.append((sub, decision.parts))
        # Full queues: wait for room (bounded) for the parts not yet queued, and close
        # slow consumers, as the key router's reader does (log.py, Router.deliver_wait).
        for sub, parts in blocked:
            if await self.router.offer_wait(sub, event, parts, self.wait_seconds()):
                outcomes["delivered"] += 1
            else:
                sub.sink.close("slow_consumer")
                outcomes["slow_consumer"] += 1
        return outcomes

    async def _visible(
        self, event: Event, identities: set[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[bool, bool]]:
        """For each (role, claims): may it see the new row, the old row? One query each."""
        new = _row_json(event, event.record, event.new_keys)
        old = _row_json(event, event.old_record, event.old_keys)
        sql = CHECK_SQL[event.table]
        answers: dict[tuple[str, str], tuple[bool, bool]] = {}
        statements = 2  # BEGIN, COMMIT
        async with self.db.as_service() as tx:
            for role in sorted({role for role, _ in identities}):
                group = sorted(claims for r, claims in identities if r == role)
                await tx.conn.execute("select set_config('role', %s, true)", (role,))
                async with tx.conn.cursor() as cur:
                    # One statement per subscriber, sent back to back (pipelined), as the
                    # hosted service runs its prepared check once per subscriber.
                    await cur.executemany(
                        sql,
                        [{"claims": claims, "new": new, "old": old} for claims in group],
                        returning=True,
                    )
                    for claims in group:
                        row = await cur.fetchone()
                        assert row is not None
                        answers[(role, claims)] = (
                            bool(row["new_visible"]),
                            bool(row["old_visible"]),
                        )
                        cur.nextset()
                statements += 1 + len(group)
        self.metrics.statements("visibility_check", statements)
        return answers
