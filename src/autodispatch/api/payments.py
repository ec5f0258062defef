"""Payment confirmation: the Stripe webhook, and a development stand-in when Stripe is off.

A paid session is queued only when its waiver is signed AND its payment is confirmed
here; the database (``api.queue_if_ready``) decides, whichever comes second.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import stripe
import structlog
from fastapi import APIRouter, Depends, Request

from autodispatch.api import deps
from autodispatch.api.dispatch import read_pair
from autodispatch.api.models import ERRORS, SessionAndAssignment
from autodispatch.domain.errors import BadRequest, Conflict, Forbidden, NotFound
from autodispatch.domain.principal import Principal

router = APIRouter(prefix="/api", tags=["payments"], responses=ERRORS)
log = structlog.get_logger("autodispatch.payments")


@router.post("/payments/stripe/webhook")
async def stripe_webhook(
    request: Request, svc: deps.Services = Depends(deps.services)
) -> dict[str, Any]:
    """Stripe calls this; `checkout.session.completed` confirms the session's payment.

    The checkout's `client_reference_id` (or `metadata.session_id`) names our session.
    """
    secret = svc.settings.stripe_webhook_secret
    if not secret:
        raise NotFound("Stripe is not configured on this server", code="stripe_disabled")
    payload = await request.body()
    try:
        # Verifies the signature and the timestamp; we then read the verified payload as
        # plain JSON (StripeObject is no longer a dict).
        stripe.WebhookSignature.verify_header(
            payload.decode("utf-8", "replace"),
            request.headers.get("stripe-signature"),
            secret,
            tolerance=300,
        )
        event = json.loads(payload)
    except stripe.SignatureVerificationError:
        raise BadRequest(
            "the Stripe-Signature header does not match this payload", code="bad_signature"
        ) from None
    except ValueError:
        raise BadRequest("the webhook body is not JSON", code="malformed_json") from None
    if not isinstance(event, dict) or event.get("type") != "checkout.session.completed":
        return {"received": True, "handled": False}
    checkout = (event.get("data") or {}).get("object") or {}
    metadata = checkout.get("metadata") or {}
    raw_id = checkout.get("client_reference_id") or metadata.get("session_id")
    try:
        session_id = UUID(str(raw_id))
    except ValueError:
        raise BadRequest(
            "the checkout has no client_reference_id naming a session", code="no_session_reference"
        ) from None
    async with svc.db.as_service() as tx:
        confirmed = await tx.value(
            "confirm_payment",
            {
                "session_id": session_id,
                "provider": "stripe",
                "provider_ref": checkout.get("id"),
                "amount_cents": checkout.get("amount_total"),
            },
        )
    log.info(
        "payment_confirmed" if confirmed else "payment_already_confirmed",
        session_id=str(session_id),
    )
    return {"received": True, "handled": True, "newly_confirmed": bool(confirmed)}


@router.post("/dev/sessions/{session_id}/confirm-payment", response_model=SessionAndAssignment)
async def dev_confirm_payment(
    session_id: UUID,
    caller: Principal = Depends(deps.user),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    """Development only (no Stripe secret configured): confirm your own session's payment."""
    if svc.settings.stripe_webhook_secret:
        raise NotFound(
            "payments are confirmed by Stripe on this server", code="dev_payments_disabled"
        )
    async with svc.db.as_principal(caller) as tx:
        pair = await read_pair(tx, session_id)
        if str(pair["session"]["customer_id"]) != str(caller.user_id):
            raise Forbidden(
                "only the customer of this session may pay for it", code="not_your_session"
            )
    async with svc.db.as_service() as tx:
        confirmed = await tx.value(
            "confirm_payment",
            {"session_id": session_id, "provider": "dev", "provider_ref": None, "amount_cents": 0},
        )
    if not confirmed:
        raise Conflict("this session's payment is already confirmed", code="already_paid")
    async with svc.db.as_principal(caller) as tx:
        return await read_pair(tx, session_id)
