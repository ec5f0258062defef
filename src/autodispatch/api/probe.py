"""Probe pings: a harmless change the caller causes and only the caller may see.

``POST /api/probe/ping`` writes a ``probe_pings`` row, a realtime table whose rows are
visible to their author alone: the /probe page and ``autodispatch probe`` subscribe,
ping, and time the event's arrival.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Body, Depends

from autodispatch.api import deps
from autodispatch.api.models import ERRORS, NewPing, PingEnvelope
from autodispatch.domain.principal import Principal

router = APIRouter(prefix="/api", responses=ERRORS, tags=["probe"])


@router.post("/probe/ping", status_code=201, response_model=PingEnvelope)
async def ping(
    body: NewPing | None = Body(default=None),
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    """Write a probe ping for the caller (any signed-in user); its event reaches only them.

    The answer is the row as written, even when a broken visibility rule hides it from
    its author: then the write worked and the event is what went missing."""
    nonce = body.nonce if body and body.nonce else "ping-" + secrets.token_hex(6)
    async with svc.db.as_principal(caller) as tx:
        row = await tx.one("probe_ping", {"nonce": nonce})
    return {"ping": row}
