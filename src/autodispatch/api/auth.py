"""Sign-up, sign-in and token refresh, in the shapes supabase-js expects (``/auth/v1``)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request, Response

from autodispatch.api import deps
from autodispatch.api.models import (
    ERRORS,
    ErrorResponse,
    PasswordGrant,
    RefreshGrant,
    Signup,
    TokenResponse,
    User,
)
from autodispatch.domain.errors import InvalidInput
from autodispatch.domain.principal import Principal

router = APIRouter(prefix="/auth/v1", tags=["auth"], responses={**ERRORS, 429: ERRORS[400]})


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.post(
    "/token",
    response_model=TokenResponse,
    responses={
        403: {
            "model": ErrorResponse,
            "description": "`account_disabled`: an admin disabled this account; it can"
            " neither sign in nor refresh",
        }
    },
)
async def token(
    request: Request,
    grant_type: Literal["password", "refresh_token"] = Query(),
    body: dict[str, Any] = Body(),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    """`grant_type=password` with `{email, password}`, or `refresh_token` with `{refresh_token}`."""
    if grant_type == "password":
        grant = PasswordGrant.model_validate(body)
        return await svc.accounts.sign_in(grant.email, grant.password, _address(request))
    refresh = RefreshGrant.model_validate(body)
    return await svc.accounts.refresh(refresh.refresh_token)


@router.post("/signup", response_model=TokenResponse)
async def signup(
    request: Request, body: Signup, svc: deps.Services = Depends(deps.services)
) -> dict[str, Any]:
    """Create a customer account and sign it in."""
    name = (body.data.name if body.data and body.data.name else body.email.split("@")[0]).strip()
    if not name:
        raise InvalidInput("data.name must not be blank", code="invalid_name")
    await svc.accounts.create_user(
        email=body.email, password=body.password, account_type="customer", full_name=name
    )
    return await svc.accounts.sign_in(body.email, body.password, _address(request))


@router.get("/user", response_model=User)
async def current_user(
    caller: Principal = Depends(deps.user), svc: deps.Services = Depends(deps.services)
) -> dict[str, Any]:
    assert caller.user_id is not None
    return await svc.accounts.user(caller.user_id)


@router.post("/logout", status_code=204)
async def logout(
    caller: Principal = Depends(deps.user), svc: deps.Services = Depends(deps.services)
) -> Response:
    """Revoke every refresh token of the caller."""
    assert caller.user_id is not None
    await svc.accounts.sign_out(caller.user_id)
    return Response(status_code=204)
