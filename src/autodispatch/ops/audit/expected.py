"""What the schema checks of `autodispatch audit` expect: the tables, the triggers each
lifecycle and the event log need, and the one visibility policy of each table as its
migration wrote it (``normalise_expression`` makes PostgreSQL's printed form compare)."""

from __future__ import annotations

import re

# Tables every check relies on, by the migration that makes them.
EXPECTED_TABLES: dict[str, str] = {
    "public.profiles": "0001",
    "public.workshops": "0001",
    "public.mechanics": "0001",
    "public.intakes": "0001",
    "public.sessions": "0001",
    "public.session_assignments": "0001",
    "public.waivers": "0001",
    "public.payments": "0001",
    "public.feature_flags": "0001",
    "public.lifecycle_transitions": "0001",
    "public.lifecycle_audit": "0001",
    "realtime.stream": "0002",
    "realtime.events": "0002",
    "public.session_messages": "0003",
    "public.alert_receipts": "0003",
    "public.push_subscriptions": "0003",
    "public.probe_pings": "0003",
    "realtime.push_cursor": "0003",
    "realtime.gateways": "0004",
    "realtime.principals": "0006",
}


# (schema.table, trigger) -> (function it runs, what it is for)
EXPECTED_TRIGGERS: dict[tuple[str, str], tuple[str, str]] = {
    ("public.sessions", "sessions_guard"): (
        "public.guard_transition",
        "refuses session moves not in lifecycle_transitions",
    ),
    ("public.sessions", "sessions_audit"): (
        "public.audit_transition",
        "writes a lifecycle_audit row per session transition",
    ),
    ("public.sessions", "sessions_create_assignment"): (
        "public.create_assignment_for_session",
        "creates the assignment with its session",
    ),
    ("public.sessions", "sessions_sync_assignment"): (
        "public.sync_assignment_with_session",
        "moves the assignment when the session ends",
    ),
    ("public.sessions", "sessions_keys"): (
        "public.refresh_session_keys",
        "keeps the session's visibility keys",
    ),
    ("public.session_assignments", "session_assignments_guard"): (
        "public.guard_transition",
        "refuses assignment moves not in lifecycle_transitions",
    ),
    ("public.session_assignments", "session_assignments_audit"): (
        "public.audit_transition",
        "writes a lifecycle_audit row per assignment transition",
    ),
    ("public.session_assignments", "session_assignments_sync_session"): (
        "public.sync_session_with_assignment",
        "moves the session when the assignment is accepted or ends",
    ),
    ("public.session_assignments", "session_assignments_visibility"): (
        "public.push_keys_to_session",
        "pushes the assignment's visibility keys to its session",
    ),
}
# Tables whose rows decide a user's visibility keys: a change writes an auth.principals
# event the gateways re-key that user's subscriptions on (trigger principal_changed).
for _table in ("public.profiles", "public.mechanics", "auth.users"):
    EXPECTED_TRIGGERS[(_table, "principal_changed")] = (
        "realtime.principal_changed",
        "tells the gateways when what a user may see changes (re-keys subscriptions)",
    )
# Tables whose changes are captured in the event log (trigger a_realtime_capture).
CAPTURED_TABLES = (
    "public.sessions",
    "public.session_assignments",
    "public.feature_flags",
    "public.session_messages",
    "public.probe_pings",
)
for _table in CAPTURED_TABLES:
    EXPECTED_TRIGGERS[(_table, "a_realtime_capture")] = (
        "realtime.capture",
        "writes every change to the event log (realtime delivery)",
    )

# Each public table the API's roles can read has one policy, "<table>_visible": SELECT for
# anon and authenticated, permissive, with exactly the expression its migration wrote (as
# PostgreSQL prints it back, normalised by ``normalise_expression``): the visibility keys
# of the row meet the caller's. A few tables are readable by everyone by design (true).
_KEYED = "{} && (select auth.principal_keys())"
EXPECTED_POLICIES: dict[str, str] = {
    "profiles": _KEYED.format("owner_visibility_keys(id)"),
    "workshops": "true",
    "mechanics": _KEYED.format("mechanic_visibility_keys(mechanics.*)"),
    "intakes": _KEYED.format("intake_visibility_keys(intakes.*)"),
    "sessions": _KEYED.format("session_visibility_keys(sessions.*)"),
    "session_assignments": _KEYED.format("assignment_visibility_keys(session_assignments.*)"),
    "waivers": _KEYED.format("owner_visibility_keys(customer_id)"),
    "payments": _KEYED.format("owner_visibility_keys(customer_id)"),
    "feature_flags": "true",
    "lifecycle_transitions": "true",
    "lifecycle_audit": _KEYED.format("array['admin'::text]"),
    "session_messages": _KEYED.format("message_visibility_keys(session_messages.*)"),
    "alert_receipts": _KEYED.format("owner_visibility_keys(mechanic_user_id)"),
    "push_subscriptions": _KEYED.format("owner_visibility_keys(user_id)"),
    "probe_pings": _KEYED.format("probe_visibility_keys(probe_pings.*)"),
}
POLICY_TABLES = set(EXPECTED_POLICIES)
OPEN_TABLES = {t for t, using in EXPECTED_POLICIES.items() if using == "true"}
# A table this code does not know yet passes when its policy has this shape: one
# visibility function of the row against the caller's keys, nothing else.
KEYED_SHAPE = re.compile(
    r"[a-z_][a-z0-9_]*visibility_keys\((?:[a-z_][a-z0-9_]*(?:\.\*)?)?\)"
    r" && \(select auth\.principal_keys\(\)\)"
)
API_ROLES = {"anon", "authenticated"}
NO_RLS_NEEDED = {"alembic_version"}  # no API role may read it (no grant), no rows to hide


def normalise_expression(expression: str | None) -> str:
    """A policy expression as ``pg_get_expr`` prints it, in a form that compares across
    PostgreSQL versions and search paths: lower case, single spaces, no ``public.``
    qualifier, no column alias on a scalar subquery, no parentheses around the whole."""
    text = " ".join((expression or "").lower().split())
    text = re.sub(r"\bpublic\.", "", text)
    text = re.sub(r"\bselect (.+?) as [a-z_][a-z0-9_]*\)", r"select \1)", text)
    text = re.sub(r"\( ", "(", text)
    text = re.sub(r" \)", ")", text)
    while text.startswith("(") and text.endswith(")") and _balanced(text[1:-1]):
        text = text[1:-1]
    return text


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0
