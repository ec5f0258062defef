"""Session chat: the customer and the accepted mechanic, from acceptance until the session ends.

Messages are rows of ``session_messages`` (row-level security: the two participants,
nobody else, not even admins) and realtime events of that table, so a page subscribed to
``session_messages`` gets each message as it is written.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from fastapi import APIRouter, Depends, Response

from autodispatch.api import deps
from autodispatch.api.models import ERRORS, MessageEnvelope, MessageList, NewMessage
from autodispatch.db.database import Tx
from autodispatch.domain.errors import AppError, Forbidden, NotFound
from autodispatch.domain.principal import Principal

router = APIRouter(prefix="/api", responses=ERRORS, tags=["chat"])

HISTORY_LIMIT = 500


async def message(tx: Tx, message_id: UUID) -> dict[str, Any]:
    row = await tx.one("message_by_id", {"message_id": message_id})
    if row is None:  # written in this transaction by this caller: always visible to them
        raise AppError(f"message {message_id} is not visible to its sender")
    return dict(row)


@router.post("/sessions/{session_id}/messages", status_code=201, response_model=MessageEnvelope)
async def send_message(
    session_id: UUID,
    body: NewMessage,
    response: Response,
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    """Write in a session's chat (its customer or its accepted mechanic, while it runs).

    409 `chat_closed` before a mechanic accepts and after the session ends.
    """
    async with svc.db.as_principal(caller) as tx:
        message_id = await tx.value("send_message", {"session_id": session_id, "body": body.body})
        row = await message(tx, message_id)
    response.headers["Cache-Control"] = "no-store"
    return {"message": row}


@router.get("/sessions/{session_id}/messages", response_model=MessageList)
async def list_messages(
    session_id: UUID,
    response: Response,
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    """The chat of a session, oldest first (the newest 500), for its two participants."""
    response.headers["Cache-Control"] = "no-store"
    async with svc.db.as_principal(caller) as tx:
        access = await tx.one("chat_access", {"session_id": session_id})
        if access is None:
            raise NotFound(f"no session {session_id} that you may see", code="session_not_found")
        if not access["participant"]:
            raise Forbidden(
                "only the customer and the mechanic who accepted this session may read its chat",
                code="not_a_participant",
            )
        items = await tx.all(
            "messages_of_session", {"session_id": session_id, "limit": HISTORY_LIMIT}
        )
    return {"items": items}
