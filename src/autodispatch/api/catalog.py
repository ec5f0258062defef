"""Feature flags, workshops and mechanics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response

from autodispatch.api import deps
from autodispatch.api.models import ERRORS, Flag, FlagChange, FlagList, MechanicList, WorkshopList
from autodispatch.domain.errors import NotFound
from autodispatch.domain.principal import Principal

router = APIRouter(prefix="/api", responses=ERRORS)


@router.get("/feature-flags", response_model=FlagList, tags=["flags"])
async def list_flags(
    response: Response,
    caller: Principal = Depends(deps.principal),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    """Every flag, enabled or not, to everyone."""
    response.headers["Cache-Control"] = "no-store"
    async with svc.db.as_principal(caller) as tx:
        return {"items": await tx.all("list_flags")}


@router.patch("/feature-flags/{key}", response_model=Flag, tags=["flags"])
async def change_flag(
    key: str,
    body: FlagChange,
    caller: Principal = Depends(deps.admin),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    async with svc.db.as_principal(caller) as tx:
        await tx.one("set_flag", {"key": key, "enabled": body.enabled})
        row = await tx.one("flag_by_key", {"key": key})
    if row is None:
        raise NotFound(f"there is no feature flag {key!r}", code="unknown_flag")
    return row


@router.get("/workshops", response_model=WorkshopList, tags=["catalog"])
async def list_workshops(
    caller: Principal = Depends(deps.principal),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    async with svc.db.as_principal(caller) as tx:
        return {"items": await tx.all("list_workshops")}


@router.get("/mechanics", response_model=MechanicList, tags=["catalog"])
async def list_mechanics(
    caller: Principal = Depends(deps.admin),
    svc: deps.Services = Depends(deps.services),
) -> dict[str, Any]:
    """Every mechanic (admins), for offers."""
    async with svc.db.as_principal(caller) as tx:
        return {"items": await tx.all("list_mechanics")}
