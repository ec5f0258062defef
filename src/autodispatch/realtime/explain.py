"""Why an event did or did not reach a user: the probe behind `autodispatch explain-delivery`."""

from __future__ import annotations

from dataclasses import dataclass

from autodispatch.db.database import Database
from autodispatch.realtime.events import Event, Variant
from autodispatch.realtime.log import load_column_types
from autodispatch.realtime.protocol import parse_filter
from autodispatch.realtime.router import Binding, NullSink, Router, Subscription, decide


@dataclass(frozen=True)
class Explanation:
    delivered: bool
    text: str


async def explain_delivery(
    db: Database,
    event_id: int,
    email: str,
    *,
    event_filter: str = "*",
    row_filter: str | None = None,
) -> Explanation:
    """Whether ``email`` (subscribed to the event's table with this event type and filter)
    gets event ``event_id``, and which visibility key or filter decides it."""
    async with db.as_service() as tx:
        row = await tx.one("event_by_id", {"id": event_id})
        user = await tx.one("user_by_email", {"email": email.strip().lower()})
    if row is None:
        return Explanation(False, f"there is no event {event_id} (pruned, or never written)")
    if user is None:
        return Explanation(False, f"there is no account {email}")
    event = Event.from_row(row)
    async with db.as_service() as tx:
        keys = frozenset(await tx.value("principal_keys_for", {"user_id": user["id"]}) or [])
    types, columns = await load_column_types(db, [event.table])
    router = Router(types, columns)
    binding = Binding(
        id=1,
        table=event.table,
        event=event_filter.upper(),
        filter=parse_filter(row_filter) if row_filter else None,
    )
    sub = Subscription(keys=keys, bindings=(binding,), sink=NullSink(), transport="explain")
    decision = decide(sub, event, router.types)
    head = (
        f"event {event.id}: {event.type} on {event.table} row {event.row_id};"
        f" {email} ({user['account_type']}) holds keys {sorted(keys)};"
        f" the row's keys were old {sorted(event.old_keys)} -> new {sorted(event.new_keys)}."
    )
    if decision.delivered:  # one binding: one part
        shared = sorted(keys & event.keys)
        removal = decision.parts[0].variant is Variant.REMOVAL
        kind = "a removal (DELETE)" if removal else event.type
        return Explanation(
            True, f"{head}\nDELIVERED as {kind}, through key(s) {', '.join(shared)}."
        )
    reasons = {
        "not_visible": "no key of the user is among the row's keys (row-level security would"
        " hide both versions from this user); it would need one of"
        f" {', '.join(sorted(event.keys)) or 'no key at all: the row has none'}",
        "filter_mismatch": f"the row is visible but the filter {row_filter!r} does not match it",
        "event_type_mismatch": f"the delivered type is not the subscribed event {event_filter!r}",
        "table_not_subscribed": "the user is not subscribed to this table",
    }
    return Explanation(
        False, f"{head}\nNOT DELIVERED: {reasons.get(decision.reason, decision.reason)}."
    )
