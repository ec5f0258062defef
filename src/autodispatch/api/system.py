"""Health, readiness, public configuration and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from autodispatch.api import deps
from autodispatch.background import Loops
from autodispatch.db.database import Tx

router = APIRouter(tags=["system"])

# The reader polls every 0.25 s: an event older than this and not routed means it is stuck.
READY_MAX_LAG_SECONDS = 10.0
READY_TIMEOUT_SECONDS = 5.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 once the server is up and serving."""
    return {"status": "ok"}


class LogReader(Protocol):
    """What readiness needs of the realtime event-log reader (the app passes it in
    ``app.state.log_reader``; this layer may not import the realtime package)."""

    routed: int  # the highest event id whose routing has finished
    started: asyncio.Event


@router.get("/readyz")
async def readyz(request: Request, svc: deps.Services = Depends(deps.services)) -> JSONResponse:
    """200 when the database answers, is migrated to this code's revision, the realtime
    log reader is caught up and every background loop completed a run lately; otherwise
    503 with the reasons (and each check's state)."""
    checks: dict[str, str] = {}
    reader: LogReader | None = getattr(request.app.state, "log_reader", None)
    loops: Loops | None = getattr(request.app.state, "loops", None)
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS), svc.db.as_service() as tx:
            revision = await tx.value("migration_revision")
            checks["database"] = "ok"
            checks["migrations"] = (
                "ok"
                if revision == svc.expected_revision
                else f"database is at revision {revision}, this code needs"
                f" {svc.expected_revision}: run `autodispatch migrate`"
            )
            if reader is not None:
                checks["realtime"] = await _reader_state(tx, reader)
    except TimeoutError:
        checks["database"] = f"database did not answer within {READY_TIMEOUT_SECONDS:.0f} s"
    except Exception as exc:  # any failure to reach the database is the answer here
        checks["database"] = f"database unreachable: {exc.__class__.__name__}: {exc}"
    if loops is not None:
        checks["background"] = "; ".join(loops.stale()) or "ok"
    reasons = [state for state in checks.values() if state != "ok"]
    if reasons:
        return JSONResponse(
            {"status": "not_ready", "reasons": reasons, "checks": checks}, status_code=503
        )
    return JSONResponse({"status": "ready", "reasons": [], "checks": checks})


async def _reader_state(tx: Tx, reader: LogReader) -> str:
    if not reader.started.is_set():
        return "the realtime log reader has not started"
    routed = reader.routed
    first = await tx.one("first_event_after", {"after": routed})
    if first is not None and first["age_seconds"] > READY_MAX_LAG_SECONDS:
        return (
            f"the realtime log reader is behind: event {first['id']}, committed"
            f" {first['age_seconds']:.1f} s ago, is not routed yet (routed through {routed};"
            f" allowed lag {READY_MAX_LAG_SECONDS:.0f} s)"
        )
    return "ok"


@router.get("/api/config")
async def public_config(svc: deps.Services = Depends(deps.services)) -> dict[str, Any]:
    """Settings a client needs: the anon key realtime clients pass as `apikey`, and more."""
    return {
        "anon_key": svc.anon_key,
        "auth_url": "/auth/v1",
        "stripe_enabled": bool(svc.settings.stripe_webhook_secret),
        "request_ttl_seconds": svc.settings.request_ttl_seconds,
    }


@router.get("/metrics", include_in_schema=False)
async def metrics(svc: deps.Services = Depends(deps.services)) -> Response:
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
