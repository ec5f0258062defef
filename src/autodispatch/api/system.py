"""Health, readiness, public configuration and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from autodispatch.api import deps

router = APIRouter(tags=["system"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 once the server is up and serving."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(svc: deps.Services = Depends(deps.services)) -> JSONResponse:
    """200 when the database answers and is migrated to this code's revision."""
    reasons: list[str] = []
    try:
        async with svc.db.as_service() as tx:
            revision = await tx.value("migration_revision")
        if revision != svc.expected_revision:
            reasons.append(
                f"database is at revision {revision}, this code needs {svc.expected_revision}"
            )
    except Exception as exc:  # any failure to reach the database is the answer here
        reasons.append(f"database unreachable: {exc.__class__.__name__}: {exc}")
    if reasons:
        return JSONResponse({"status": "not_ready", "reasons": reasons}, status_code=503)
    return JSONResponse({"status": "ready", "reasons": []})


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
