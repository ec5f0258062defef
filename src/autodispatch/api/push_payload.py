"""What a Web Push carries, and to whom: which events make a request newly takeable by
which mechanics' keys, and the JSON a service worker shows without a fetch."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

# Keys that let a mechanic take a request (assignment_visibility_keys in migration 0001).
TAKEABLE_PREFIXES = ("pool:", "mechanic:")
TAKEABLE_STATUSES = ("queued", "offered")
# A queued request is new only when it comes from here (created queued, or its waiver
# signed); from "offered" it is a request returning to the queue, which alerts nobody.
FIRST_QUEUED_FROM = (None, "pending_waiver")
# The JSON we send must fit one aes128gcm record (4096 bytes with 103 of overhead);
# stay well inside it. A long concern is shortened to fit.
PAYLOAD_BUDGET = 3000
NOTIFICATION_BODY_CHARS = 140


def newly_takeable(event: Mapping[str, Any]) -> frozenset[str]:
    """The keys of mechanics who may take this event's new version and could not take the
    old one, when the event is a request first queued or an offer (empty otherwise)."""
    if event["table_name"] != "session_assignments" or event["type"] == "DELETE":
        return frozenset()
    status = (event["record"] or {}).get("status")
    if status not in TAKEABLE_STATUSES:
        return frozenset()
    if status == "queued" and event.get("old_status") not in FIRST_QUEUED_FROM:
        return frozenset()
    gained = set(event["new_keys"] or ()) - set(event["old_keys"] or ())
    return frozenset(key for key in gained if key.startswith(TAKEABLE_PREFIXES))


def _dumps(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str)


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1].rstrip() + "…"


def build_payload(
    event_id: int, committed_at: datetime, record: Mapping[str, Any], expires_at: datetime | None
) -> str:
    """The push's JSON: all a service worker needs to show the request, no fetch."""
    summary = dict(record.get("request_summary") or {})
    concern = str(summary.get("concern") or "")
    first_name = summary.get("customer_first_name") or "A customer"
    payload: dict[str, Any] = {
        "type": "new_request",
        "event_id": event_id,
        "assignment_id": record["id"],
        "session_id": record.get("session_id"),
        "status": record.get("status"),
        "request_summary": summary,
        "title": f"New request: {summary.get('vehicle') or 'a vehicle'}",
        "body": _clip(f"{first_name}: {concern}", NOTIFICATION_BODY_CHARS),
        "tag": f"request-{record['id']}",
        "url": "/mechanic",
        "committed_at": committed_at.isoformat(),
        "expires_at": expires_at.isoformat() if expires_at else None,
    }
    text = _dumps(payload)
    while len(text.encode()) > PAYLOAD_BUDGET and concern:
        # Cut the concern's UTF-8 by the excess (and the ellipsis), never inside a character.
        keep = len(concern.encode()) - (len(text.encode()) - PAYLOAD_BUDGET) - len("…".encode())
        concern = concern.encode()[: max(0, keep)].decode(errors="ignore").rstrip()
        summary["concern"] = concern + "…"
        text = _dumps(payload)
    return text
