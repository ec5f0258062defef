"""Alert receipts from mechanics' pages, and the delivery health admins read from them.

After each new-request alert the mechanic's page posts which tiers worked, which failed
and why, and the time from the request's commit to the alert being shown. A receipt is
about one ``session_assignments`` event the mechanic could see (row-level security's
keys, as the realtime router judged them): the one that brought the alert, or for an
alert raised from a queue read, the latest event that made the request the mechanic's.
Anything else is 404, existing or not. Each receipt is stored once per (mechanic, event)
and counted once in ``/metrics``; admins read a summary of a recent window.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Query, Response

from autodispatch.api import deps
from autodispatch.api.models import (
    ALERT_TIER_STATUSES,
    ALERT_TIERS,
    ERRORS,
    AlertHealth,
    AlertReceiptEnvelope,
    NewAlertReceipt,
)
from autodispatch.domain.errors import AppError
from autodispatch.domain.principal import Principal

router = APIRouter(prefix="/api", responses=ERRORS, tags=["alerts"])

RECENT_FAILURES = 20


@router.post(
    "/alert-receipts",
    status_code=201,
    response_model=AlertReceiptEnvelope,
    responses={200: {"model": AlertReceiptEnvelope, "description": "Already reported"}},
)
async def record_receipt(
    body: NewAlertReceipt,
    response: Response,
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    """Report one alert (mechanics). 201 when recorded; 200 with the first receipt when
    this event was already reported (a retry), which is not counted again; 404
    `alert_event_not_found` unless the event (or the assignment) is one you could see."""
    tiers = {tier: report.model_dump(exclude_none=True) for tier, report in body.tiers.items()}
    async with svc.db.as_principal(caller) as tx:
        row = await tx.one(
            "record_alert_receipt",
            {
                "assignment_id": body.assignment_id,
                "event_id": body.event_id,
                "tiers": json.dumps(tiers),
                "commit_to_shown_ms": body.commit_to_shown_ms,
            },
        )
        assert row is not None  # the function always returns its one row
        receipt = await tx.one("alert_receipt_by_id", {"receipt_id": row["receipt_id"]})
    if receipt is None:
        raise AppError(f"receipt {row['receipt_id']} is not visible to its mechanic")
    if row["created"]:
        # Counted after the commit: a receipt that was rolled back is not in /metrics.
        for tier, report in body.tiers.items():
            svc.metrics.alert_tiers.labels(tier, report.status).inc()
        if body.commit_to_shown_ms is not None:
            svc.metrics.alert_commit_to_shown.observe(body.commit_to_shown_ms / 1000)
    else:
        response.status_code = 200
    return {"receipt": receipt}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@router.get("/admin/alert-health", response_model=AlertHealth)
async def alert_health(
    response: Response,
    minutes: int = Query(default=60, ge=1, le=7 * 24 * 60, description="The window"),
    caller: Principal = Depends(deps.admin),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    """Alerts shown and failed per tier, commit-to-shown percentiles and the latest failures,
    over the last `minutes` (admins)."""
    response.headers["Cache-Control"] = "no-store"
    window = {"minutes": minutes}
    async with svc.db.as_principal(caller) as tx:
        counts = await tx.all("alert_tier_counts", window)
        latency = await tx.one("alert_latency", window)
        failures = await tx.all("alert_recent_failures", {**window, "limit": RECENT_FAILURES})
    tiers: dict[str, dict[str, int]] = {
        tier: dict.fromkeys(ALERT_TIER_STATUSES, 0) for tier in ALERT_TIERS
    }
    for row in counts:
        tiers.setdefault(row["tier"], dict.fromkeys(ALERT_TIER_STATUSES, 0))[row["status"]] = row[
            "alerts"
        ]
    assert latency is not None  # an aggregate always returns a row
    return {
        "window_minutes": minutes,
        "tiers": tiers,
        "latency_ms": {
            "count": latency["count"],
            "p50": _ms(latency["p50"]),
            "p95": _ms(latency["p95"]),
            "p99": _ms(latency["p99"]),
        },
        "recent_failures": failures,
    }
