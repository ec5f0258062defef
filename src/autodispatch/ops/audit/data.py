"""The data and realtime checks of `autodispatch audit` (plain SQL; see ``audit``)."""

from __future__ import annotations

from typing import Any

from autodispatch.config import EXPIRY_GRACE_SECONDS, SEQUENCE_GRACE_SECONDS
from autodispatch.domain.lifecycle import ASSIGNMENT, SESSION
from autodispatch.ops.audit.context import AuditContext
from autodispatch.ops.reconcile import PAIR_KINDS, pair_kind

DATA = "data"
REALTIME = "realtime"

PAIR_TABLES = {
    "public.sessions": ["id", "status"],
    "public.session_assignments": ["id", "session_id", "status"],
}


def _total(rows: list[Any]) -> int:
    return int(rows[0]["total"]) if rows else 0


async def check_pairs(ctx: AuditContext) -> None:
    """Sessions and assignments that disagree, one finding per kind of disagreement."""
    if not ctx.needs("session/assignment pairs", DATA, PAIR_TABLES):
        return
    by_kind: dict[str, list[tuple[str, str, int]]] = {}
    for row in await ctx.rows("audit_pair_counts"):
        s, a = row["session_status"], row["assignment_status"]
        if s not in SESSION.states or a not in ASSIGNMENT.states:
            continue  # the unknown-status check reports these
        code = pair_kind(s, a)
        if code is not None:
            by_kind.setdefault(code, []).append((s, a, row["n"]))
    for code, pairs in by_kind.items():
        kind = PAIR_KINDS[code]
        count = sum(n for _, _, n in pairs)
        rows = await ctx.rows(
            "audit_pairs_rows",
            {
                "session_statuses": [s for s, _, _ in pairs],
                "assignment_statuses": [a for _, a, _ in pairs],
                "limit": ctx.options.row_limit,
            },
        )
        detail = ", ".join(f"{s}/{a}: {n}" for s, a, n in sorted(pairs))
        ctx.found(
            code,
            DATA,
            f"{count} sessions {kind.title} (session/assignment: {detail}).",
            kind.fix,
            rows,
            count=count,
            repairable=True,
        )


async def check_unknown_statuses(ctx: AuditContext) -> None:
    if not ctx.needs("unknown statuses", DATA, PAIR_TABLES):
        return
    for query, lifecycle in (
        ("audit_unknown_session_statuses", SESSION),
        ("audit_unknown_assignment_statuses", ASSIGNMENT),
    ):
        rows = await ctx.rows(
            query, {"statuses": sorted(lifecycle.states), "limit": ctx.options.row_limit}
        )
        if rows:
            seen = sorted({str(r[f"{lifecycle.entity}_status"]) for r in rows})
            ctx.found(
                "unknown_status",
                DATA,
                f"{_total(rows)} {lifecycle.entity} rows have a status the {lifecycle.entity}"
                f" lifecycle does not know ({', '.join(seen)}).",
                "Decide what each status meant (the first version's 'declined' was a mechanic"
                " passing on a request: 'queued' again), update those rows by hand, then run"
                " `autodispatch repair` for what remains inconsistent.",
                rows,
                count=_total(rows),
            )


async def check_sessions_without_assignment(ctx: AuditContext) -> None:
    if not ctx.needs("sessions without an assignment", DATA, PAIR_TABLES):
        return
    rows = await ctx.rows("audit_sessions_without_assignment", {"limit": ctx.options.row_limit})
    if rows:
        ctx.found(
            "session_without_assignment",
            DATA,
            f"{_total(rows)} sessions have no assignment: no mechanic ever sees them (the"
            " first version created some free sessions this way).",
            "`autodispatch repair --apply` creates each assignment in the state its session"
            " implies (queued when the waiver, and a paid session's payment, are in).",
            rows,
            count=_total(rows),
            repairable=True,
        )


async def check_offers_past_expiry(ctx: AuditContext) -> None:
    needs = {"public.session_assignments": ["status", "offer_expires_at", "offered_to"]}
    if not ctx.needs("offers past their expiry", DATA, needs):
        return
    rows = await ctx.rows(
        "audit_offers_past_expiry",
        {"grace_seconds": EXPIRY_GRACE_SECONDS, "limit": ctx.options.row_limit},
    )
    if rows:
        ctx.found(
            "offer_past_expiry",
            DATA,
            f"{_total(rows)} offers are still open more than {EXPIRY_GRACE_SECONDS} s after"
            " they expired: the expiry task (every serve process runs it) is not running or"
            " keeps failing.",
            "Check that a serve process runs and its log shows no expiry_failed;"
            " `autodispatch repair --apply` returns them to the queue now.",
            rows,
            count=_total(rows),
            repairable=True,
        )


async def check_requests_past_ttl(ctx: AuditContext) -> None:
    needs = {"public.session_assignments": ["status", "queued_at"]}
    if not ctx.needs("requests past their time to live", DATA, needs):
        return
    ttl = ctx.options.request_ttl_seconds
    rows = await ctx.rows(
        "audit_requests_past_ttl",
        {
            "request_ttl_seconds": ttl,
            "grace_seconds": EXPIRY_GRACE_SECONDS,
            "limit": ctx.options.row_limit,
        },
    )
    if rows:
        ctx.found(
            "request_past_ttl",
            DATA,
            f"{_total(rows)} requests have been queued for longer than the request time to"
            f" live ({ttl} s, AUTODISPATCH_REQUEST_TTL_SECONDS) without expiring.",
            "Check that a serve process runs (it expires requests) with the same"
            " AUTODISPATCH_REQUEST_TTL_SECONDS; `autodispatch repair --apply` expires them"
            " now (and cancels their sessions).",
            rows,
            count=_total(rows),
            repairable=True,
        )


async def check_session_keys(ctx: AuditContext) -> None:
    needs = {
        **PAIR_TABLES,
        "public.sessions": ["id", "visibility_keys"],
        "public.assignment_visibility_keys()": [],
    }
    if not ctx.needs("session visibility keys", DATA, needs):
        return
    rows = await ctx.rows("audit_stale_session_keys", {"limit": ctx.options.row_limit})
    if rows:
        ctx.found(
            "stale_session_keys",
            DATA,
            f"{_total(rows)} sessions carry visibility keys that are not their assignment's:"
            " the wrong people can read them (or the right ones cannot), through the API and"
            " realtime alike.",
            "`autodispatch repair --apply` recomputes them (and sends the change to subscribers).",
            rows,
            count=_total(rows),
            repairable=True,
        )


async def check_event_log(ctx: AuditContext) -> None:
    if not ctx.needs("event log", REALTIME, {"realtime.stream": [], "realtime.events": []}):
        return
    rows = await ctx.rows("audit_stream")
    if not rows:
        ctx.found(
            "stream_row_missing",
            REALTIME,
            "realtime.stream has no row: no event can get an id, so every write that"
            " changes a subscribed table fails at commit.",
            "`insert into realtime.stream (id, last_id) select 1, coalesce(max(id), 0)"
            " from realtime.events;`",
        )
        return
    head = dict(rows[0])
    ctx.report.facts["event_log"] = head
    if head["max_event_id"] is not None and head["max_event_id"] > head["last_id"]:
        ctx.found(
            "stream_behind_events",
            REALTIME,
            f"realtime.stream says the last event is {head['last_id']} but events go up to"
            f" {head['max_event_id']}: the next commits will collide with existing ids.",
            "`update realtime.stream set last_id = (select max(id) from realtime.events)"
            " where id = 1;`",
            [head],
        )
    stuck = await ctx.rows(
        "audit_events_without_id",
        {"limit": ctx.options.row_limit, "grace": SEQUENCE_GRACE_SECONDS},
    )
    if stuck:
        ctx.found(
            "event_without_id",
            REALTIME,
            f"{_total(stuck)} events committed more than {SEQUENCE_GRACE_SECONDS} s ago"
            " still have no id: no server is giving ids (each `serve` process does, after"
            " its own writes and every AUTODISPATCH_REALTIME_SEQUENCE_POLL_INTERVAL"
            " seconds), so no subscriber has received them.",
            "Start `autodispatch serve` (or look at why its realtime-sequencer loop fails:"
            " /readyz, autodispatch_background_loop_errors_total); `autodispatch repair"
            " --apply` gives them their ids now, in order, as a server would.",
            stuck,
            count=_total(stuck),
            repairable=True,
        )


async def check_gateways(ctx: AuditContext) -> None:
    needs: dict[str, list[str]] = {
        "realtime.gateways": [],
        "realtime.events": [],
        # Live or stopped: one rule for the audit, the repair and the gauge (migration 0004).
        "realtime.gateway_is_live()": [],
    }
    if not ctx.needs("gateways", REALTIME, needs):
        return
    head = ctx.report.facts.get("event_log", {}).get("last_id")
    gateways: list[dict[str, Any]] = []
    lagging, stopped = [], []
    for row in await ctx.rows("audit_gateways"):
        g = dict(row)
        g["behind"] = max((head or 0) - g["position"], 0)
        gateways.append(g)
        named = {
            "gateway": g["id"],
            "host": g["host"],
            "pid": g["pid"],
            "seen_at": g["seen_at"],
            "position": g["position"],
        }
        if not g["live"]:
            stopped.append({**named, "silent_seconds": round(g["silent_seconds"], 1)})
        elif g["lag_seconds"] > ctx.options.lag_threshold_seconds:
            lagging.append(
                {
                    **named,
                    "next_event_id": g["next_event_id"],
                    "lag_seconds": round(g["lag_seconds"], 1),
                }
            )
    ctx.report.facts["gateways"] = gateways
    live = [g for g in gateways if g["live"]]
    ctx.report.facts["subscribers"] = sum(g["subscribers"] for g in live)
    if live:
        slowest = min(live, key=lambda g: g["position"])
        if slowest["next_event_id"] is not None:
            ctx.report.facts["oldest_undelivered_event"] = {
                "id": slowest["next_event_id"],
                "age_seconds": slowest["next_event_age_seconds"],
                "gateway": slowest["id"],
            }
        ctx.report.facts["log_lag_seconds"] = max(g["lag_seconds"] for g in live)
    if lagging:
        ctx.found(
            "gateway_lagging",
            REALTIME,
            f"{len(lagging)} gateways were more than {ctx.options.lag_threshold_seconds:.0f} s"
            " behind the event log at their last heartbeat: their subscribers get events late.",
            "Look at that process (CPU, its log for event_log_read_failed, slow consumers);"
            " restarting it is safe: its clients resume from their cursors elsewhere.",
            lagging,
        )
    if stopped:
        ctx.found(
            "gateway_stopped",
            REALTIME,
            f"{len(stopped)} gateways stopped beating without shutting down (killed, out of"
            " memory, a lost host): their clients had to reconnect elsewhere.",
            "Find out why from that host's logs; `autodispatch repair --apply` forgets these"
            " rows (a process that is in fact alive registers again at its next beat).",
            stopped,
            repairable=True,
        )


async def check_push_cursor(ctx: AuditContext) -> None:
    """The Web Push sender's cursor (migration 0003): present, and not far behind the log
    while servers run (each server runs the sender; one at a time sends)."""
    needs = {"realtime.push_cursor": ["id", "last_id"], "realtime.stream": ["last_id"]}
    if not ctx.needs("push cursor", REALTIME, needs):
        return
    rows = await ctx.rows("audit_push_cursor")
    if not rows:
        ctx.found(
            "push_cursor_missing",
            REALTIME,
            "realtime.push_cursor has no row (or realtime.stream has none): no server sends"
            " Web Push, so mechanics whose page is closed are never told of a request.",
            "`insert into realtime.push_cursor (id, last_id) select 1, last_id from"
            " realtime.stream;` (pushes resume from the log's head).",
        )
        return
    cursor = dict(rows[0])
    ctx.report.facts["push_cursor"] = cursor
    if cursor["push_position"] > cursor["stream_last_id"]:
        ctx.found(
            "push_cursor_ahead",
            REALTIME,
            f"realtime.push_cursor is at event {cursor['push_position']}, past the log's head"
            f" ({cursor['stream_last_id']}): no push is sent until the log catches up (a"
            " restored or copied database?).",
            "`update realtime.push_cursor set last_id = (select last_id from realtime.stream)"
            " where id = 1;`",
            [cursor],
        )
        return
    running = any(g["live"] for g in ctx.report.facts.get("gateways", []))
    threshold = ctx.options.push_lag_threshold_seconds
    if running and cursor["lag_seconds"] > threshold:
        ctx.found(
            "push_cursor_behind",
            REALTIME,
            f"Web Push is {cursor['behind']} events behind the log; the oldest not pushed"
            f" committed {cursor['lag_seconds']:.0f} s ago (more than {threshold:.0f} s) while"
            " servers run: mechanics whose page is closed hear of requests late, or not at all.",
            "Look at the servers' logs for push_run_failed and at"
            ' autodispatch_push_runs_total{outcome="error"}; a sender stuck holding the'
            " cursor's lock is released by restarting it.",
            [cursor],
            severity="warning",
        )


DATA_CHECKS = [
    ("session/assignment pairs", DATA, check_pairs),
    ("unknown statuses", DATA, check_unknown_statuses),
    ("sessions without an assignment", DATA, check_sessions_without_assignment),
    ("offers past their expiry", DATA, check_offers_past_expiry),
    ("requests past their time to live", DATA, check_requests_past_ttl),
    ("session visibility keys", DATA, check_session_keys),
]
REALTIME_CHECKS = [
    ("event log", REALTIME, check_event_log),
    ("gateways", REALTIME, check_gateways),
    ("push cursor", REALTIME, check_push_cursor),  # after gateways: it needs to know who runs
]
