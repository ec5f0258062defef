"""Sessions, waivers, the mechanic queue and assignments.

Every route runs in one transaction as the caller (row-level security decides reads);
every change goes through one ``api.*`` function in the database, which checks the
caller and the state and raises instead of reporting success for nothing.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from fastapi import APIRouter, Body, Depends, Response
from fastapi.responses import JSONResponse

from autodispatch.api import deps
from autodispatch.api.models import (
    ERRORS,
    AssignmentList,
    CreateSession,
    Offer,
    SessionAndAssignment,
    SessionList,
    SignWaiver,
)
from autodispatch.db.database import Tx
from autodispatch.domain.errors import Forbidden, NotFound
from autodispatch.domain.principal import Principal

router = APIRouter(prefix="/api", responses=ERRORS)

NO_STORE = {"Cache-Control": "no-store"}


async def read_pair(tx: Tx, session_id: UUID) -> dict[str, Any]:
    """The session and its assignment, as the caller may see them."""
    row = await tx.one("session_pair", {"session_id": session_id})
    if row is None:
        raise NotFound(f"no session {session_id} that you may see", code="session_not_found")
    return dict(row)


@router.post("/sessions", status_code=201, response_model=SessionAndAssignment, tags=["sessions"])
async def create_session(
    body: CreateSession,
    response: Response,
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    """Request a session. Its assignment starts in `pending_waiver`, in nobody's queue."""
    async with svc.db.as_principal(caller) as tx:
        session_id = await tx.value(
            "create_session",
            {
                "type": body.type,
                "plan": body.plan,
                "workshop_id": body.workshop_id,
                **body.intake.model_dump(),
            },
        )
        pair = await read_pair(tx, session_id)
    response.headers.update(NO_STORE)
    return pair


@router.get("/sessions", response_model=SessionList, tags=["sessions"])
async def list_sessions(
    response: Response,
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    """The caller's own sessions (as customer or as accepted mechanic), newest first."""
    async with svc.db.as_principal(caller) as tx:
        items = await tx.all("sessions_of_caller", {"limit": 100})
    response.headers.update(NO_STORE)
    return {"items": items}


@router.get("/sessions/{session_id}", response_model=SessionAndAssignment, tags=["sessions"])
async def get_session(
    session_id: UUID,
    response: Response,
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    async with svc.db.as_principal(caller) as tx:
        pair = await read_pair(tx, session_id)
    response.headers.update(NO_STORE)
    return pair


@router.post(
    "/sessions/{session_id}/waiver", response_model=SessionAndAssignment, tags=["sessions"]
)
async def sign_waiver(
    session_id: UUID,
    response: Response,
    body: SignWaiver | None = Body(default=None),
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    """Sign the waiver. A free session is queued at once; a paid one once payment is confirmed."""
    signed_name = body.signed_name if body else None
    async with svc.db.as_principal(caller) as tx:
        if signed_name is None:
            profile = await tx.one("own_profile")
            signed_name = profile["full_name"] if profile else "customer"
        await tx.value("sign_waiver", {"session_id": session_id, "signed_name": signed_name})
        pair = await read_pair(tx, session_id)
    response.headers.update(NO_STORE)
    return pair


def pair_response(pair: dict[str, Any]) -> JSONResponse:
    """The pair as JSON, sent as is: it comes from jsonb, already in its wire shape, so the
    hot paths (accept, start, end) skip validating it again against the response model."""
    return JSONResponse(pair, headers=NO_STORE)


async def _session_action(
    svc: deps.Services, caller: Principal, session_id: UUID, query: str, **params: Any
) -> JSONResponse:
    async with svc.db.as_principal(caller) as tx:
        await tx.one(query, {"session_id": session_id, **params})
        return pair_response(await read_pair(tx, session_id))


@router.post("/sessions/{session_id}/start", response_model=SessionAndAssignment, tags=["sessions"])
async def start_session(
    session_id: UUID,
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> JSONResponse:
    """Start an accepted session (the customer or the accepted mechanic)."""
    return await _session_action(svc, caller, session_id, "start_session")


@router.post("/sessions/{session_id}/end", response_model=SessionAndAssignment, tags=["sessions"])
async def end_session(
    session_id: UUID,
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> JSONResponse:
    """End a session from either side: `completed` if it went live, else `cancelled`."""
    return await _session_action(svc, caller, session_id, "end_session", cancel=False)


@router.post(
    "/sessions/{session_id}/cancel", response_model=SessionAndAssignment, tags=["sessions"]
)
async def cancel_session(
    session_id: UUID,
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> JSONResponse:
    """Cancel a session that has not ended; it leaves every queue."""
    return await _session_action(svc, caller, session_id, "end_session", cancel=True)


@router.get("/mechanic/queue", response_model=AssignmentList, tags=["queue"])
async def mechanic_queue(
    response: Response,
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    """The requests this mechanic may take, oldest first. Never cached."""
    response.headers.update(NO_STORE)
    if caller.account_type not in ("mechanic", "admin"):
        raise Forbidden("only mechanics have a queue", code="wrong_role")
    async with svc.db.as_principal(caller) as tx:
        items = await tx.all("open_queue", {"limit": 500})
    return {"items": items}


async def _assignment_action(
    svc: deps.Services, caller: Principal, query: str, params: dict[str, Any]
) -> JSONResponse:
    async with svc.db.as_principal(caller) as tx:
        session_id = await tx.value(query, params)
        return pair_response(await read_pair(tx, session_id))


@router.get("/assignments/{assignment_id}", tags=["assignments"])
async def get_assignment(
    assignment_id: UUID,
    response: Response,
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    response.headers.update(NO_STORE)
    async with svc.db.as_principal(caller) as tx:
        row = await tx.one("assignment_by_id", {"assignment_id": assignment_id})
    if row is None:
        raise NotFound(f"no request {assignment_id} that you may see", code="assignment_not_found")
    return {"assignment": row}


@router.post(
    "/assignments/{assignment_id}/accept", response_model=SessionAndAssignment, tags=["assignments"]
)
async def accept(
    assignment_id: UUID,
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> JSONResponse:
    """Take a request. The first mechanic wins; everyone else gets 409 `already_taken`."""
    return await _assignment_action(
        svc, caller, "accept_assignment", {"assignment_id": assignment_id}
    )


@router.post(
    "/assignments/{assignment_id}/decline",
    response_model=SessionAndAssignment,
    tags=["assignments"],
)
async def decline(
    assignment_id: UUID,
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> JSONResponse:
    """Decline an offer made to you; the request goes back to everyone's queue."""
    return await _assignment_action(
        svc, caller, "decline_assignment", {"assignment_id": assignment_id}
    )


@router.post(
    "/assignments/{assignment_id}/offer", response_model=SessionAndAssignment, tags=["assignments"]
)
async def offer(
    assignment_id: UUID,
    body: Offer,
    caller: Principal = Depends(deps.admin),
    svc: deps.Services = Depends(deps.services),
) -> JSONResponse:
    """Offer a queued request to one mechanic for `ttl_seconds`; then it returns to the queue."""
    return await _assignment_action(
        svc,
        caller,
        "offer_assignment",
        {
            "assignment_id": assignment_id,
            "mechanic_id": body.mechanic_id,
            "ttl_seconds": body.ttl_seconds,
        },
    )
