"""Broadcast over HTTP: ``POST /realtime/v1/api/broadcast`` (hosted path) and
``POST /api/broadcast`` (upstream path), as the Supabase clients send it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from autodispatch.api import deps
from autodispatch.api.models import ERRORS
from autodispatch.domain.errors import InvalidInput, NotAuthenticated
from autodispatch.domain.principal import Principal
from autodispatch.realtime.broker import PayloadTooLarge
from autodispatch.realtime.protocol import TOPIC_PREFIX

router = APIRouter(tags=["realtime"], responses=ERRORS)


class BroadcastMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    topic: str = Field(
        min_length=1, max_length=255, description="Channel name, without 'realtime:'"
    )
    event: str = Field(min_length=1, max_length=255)
    payload: dict[str, Any] = Field(default_factory=dict)
    private: bool = False


class BroadcastBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[BroadcastMessage] = Field(min_length=1, max_length=100)


def _caller(request: Request) -> Principal:
    """A valid token is required: the apikey header or a bearer token."""
    apikey = request.headers.get("apikey") or request.headers.get("x-api-key")
    token = deps.bearer_token(request) or apikey
    if not token:
        raise NotAuthenticated("send the apikey (header `apikey`) or a bearer token")
    return deps.services(request).tokens.principal(token)


async def _broadcast(request: Request, body: BroadcastBody) -> JSONResponse:
    broker = request.app.state.gateway.broker
    for message in body.messages:
        name = message.topic.removeprefix(TOPIC_PREFIX)
        if not name:
            raise InvalidInput("topic must name a channel", code="TopicNameRequired")
        try:
            await broker.broadcast(TOPIC_PREFIX + name, message.event, message.payload, None)
        except PayloadTooLarge as exc:
            raise InvalidInput(str(exc), code="PayloadTooLarge") from None
    return JSONResponse({}, status_code=202)


@router.post("/realtime/v1/api/broadcast", status_code=202)
async def hosted_broadcast(
    request: Request, body: BroadcastBody, caller: Principal = Depends(_caller)
) -> JSONResponse:
    """Send broadcasts to every subscriber of each topic, on every server process."""
    return await _broadcast(request, body)


@router.post("/api/broadcast", status_code=202)
async def upstream_broadcast(
    request: Request, body: BroadcastBody, caller: Principal = Depends(_caller)
) -> JSONResponse:
    """The same, at the path the upstream server uses."""
    return await _broadcast(request, body)
