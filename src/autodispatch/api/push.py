"""Web Push subscriptions: the VAPID public key, and saving or removing a browser's subscription.

The pushes themselves are sent by ``push_sender.PushSender``, a background task of the app.
An endpoint is an address the server will POST to, so it is checked here against the
same rule the sender enforces on every connection (``push_network.EndpointPolicy``): a
public host name resolving only to public addresses, unless the host is in
``AUTODISPATCH_PUSH_ALLOWED_HOSTS``.
"""

from __future__ import annotations

import binascii
from typing import Any
from urllib.parse import urlsplit

import structlog
from fastapi import APIRouter, Depends, Request, Response

from autodispatch.api import deps
from autodispatch.api.models import (
    ERRORS,
    NewPushSubscription,
    PushEndpoint,
    PushPublicKey,
    PushSubscriptionEnvelope,
)
from autodispatch.api.push_keys import b64url_decode
from autodispatch.api.push_network import EndpointRefused
from autodispatch.api.push_sender import PushSender
from autodispatch.domain.errors import AppError, Forbidden, InvalidInput, NotFound
from autodispatch.domain.principal import Principal

log = structlog.get_logger("autodispatch.push")

router = APIRouter(prefix="/api/push", responses=ERRORS, tags=["push"])

# Browsers' push services are public https hosts; this refusal says so, and no more (which
# internal names exist is nothing a caller needs to learn from it).
NOT_A_PUSH_SERVICE = (
    "endpoint must be the https URL of the browser's push service"
    " (PushSubscription.endpoint): a public host name, not an IP address or a local name"
)


def sender(request: Request) -> PushSender:
    push: PushSender = request.app.state.push
    return push


async def _check_endpoint(push: PushSender, endpoint: str) -> None:
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (
        parts.scheme != "https"
        or not parts.hostname
        or parts.username is not None
        or parts.password is not None
        or port == -1
    ):
        raise InvalidInput(NOT_A_PUSH_SERVICE, code="invalid_push_subscription")
    try:
        await push.policy.check_endpoint(endpoint)
    except EndpointRefused as exc:
        log.info("push_endpoint_refused", host=parts.hostname, reason=str(exc))
        raise InvalidInput(NOT_A_PUSH_SERVICE, code="invalid_push_subscription") from None


def _decoded(value: str) -> bytes:
    try:
        return b64url_decode(value)
    except (binascii.Error, ValueError):
        return b""


def _check_keys(p256dh: str, auth: str) -> None:
    point = _decoded(p256dh)
    if len(point) != 65 or point[0] != 4:
        raise InvalidInput(
            "keys.p256dh must be the base64url uncompressed P-256 point (65 bytes) from"
            " PushSubscription.toJSON()",
            code="invalid_push_subscription",
        )
    if len(_decoded(auth)) != 16:
        raise InvalidInput(
            "keys.auth must be the base64url 16-byte secret from PushSubscription.toJSON()",
            code="invalid_push_subscription",
        )


@router.get("/public-key", response_model=PushPublicKey)
async def public_key(push: PushSender = Depends(sender)) -> dict[str, Any]:
    """The VAPID public key to subscribe with (`applicationServerKey`). Public."""
    return {"public_key": push.keys.public_key}


@router.post("/subscriptions", status_code=201, response_model=PushSubscriptionEnvelope)
async def save_subscription(
    body: NewPushSubscription,
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
    push: PushSender = Depends(sender),
) -> dict[str, Any]:
    """Save this browser's push subscription for the calling mechanic. The same endpoint
    again replaces its keys (and moves it to this account). A mechanic keeps at most
    10 subscriptions: saving an eleventh deletes the one least recently used."""
    if caller.account_type != "mechanic":
        # Before the endpoint's DNS lookup: nobody else's endpoint is worth resolving.
        raise Forbidden("only mechanic accounts save push subscriptions", code="wrong_role")
    _check_keys(body.keys.p256dh, body.keys.auth)
    await _check_endpoint(push, body.endpoint)
    async with svc.db.as_principal(caller) as tx:
        subscription_id = await tx.value(
            "save_push_subscription",
            {"endpoint": body.endpoint, "p256dh": body.keys.p256dh, "auth": body.keys.auth},
        )
        row = await tx.one("push_subscription_by_id", {"subscription_id": subscription_id})
    if row is None:
        raise AppError(f"push subscription {subscription_id} is not visible to its owner")
    return {
        "subscription": {
            "id": row["id"],
            "endpoint": row["endpoint"],
            "created_at": row["created_at"],
        }
    }


@router.delete("/subscriptions", status_code=204, response_class=Response)
async def delete_subscription(
    body: PushEndpoint,
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> Response:
    """Remove one of your push subscriptions (say, when signing out of this browser)."""
    async with svc.db.as_principal(caller) as tx:
        deleted = await tx.value("delete_push_subscription", {"endpoint": body.endpoint})
    if not deleted:
        raise NotFound(
            "you have no push subscription with this endpoint", code="push_subscription_not_found"
        )
    return Response(status_code=204)
