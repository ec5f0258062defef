"""Request and response bodies. Requests refuse unknown fields and out-of-range values."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, TypeAlias
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


ShortText: TypeAlias = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=60)
]
NameText: TypeAlias = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)
]
ConcernText: TypeAlias = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)
]


class Intake(Strict):
    name: NameText = Field(description="The customer's name; the first word is shown to mechanics")
    vehicle_year: int = Field(ge=1900, description="1900 to next year")
    vehicle_make: ShortText
    vehicle_model: ShortText
    concern: ConcernText

    @field_validator("vehicle_year")
    @classmethod
    def _not_future(cls, year: int) -> int:
        latest = datetime.now().year + 1
        if year > latest:
            raise ValueError(f"must be from 1900 to {latest}")
        return year


class CreateSession(Strict):
    type: Literal["free", "paid"]
    plan: ShortText | None = None
    intake: Intake
    workshop_id: UUID | None = None


class SignWaiver(Strict):
    signed_name: NameText | None = Field(
        default=None, description="The name signed; the account's name when left out"
    )


class Offer(Strict):
    mechanic_id: UUID
    ttl_seconds: int = Field(default=120, ge=5, le=86400)


class FlagChange(Strict):
    enabled: bool


class PasswordGrant(BaseModel):
    # supabase-js sends extra fields (gotrue_meta_security, ...): ignore them.
    model_config = ConfigDict(extra="ignore")
    email: str = Field(max_length=254)
    password: str = Field(max_length=1000)


class RefreshGrant(BaseModel):
    model_config = ConfigDict(extra="ignore")
    refresh_token: str = Field(min_length=1, max_length=500)


class SignupData(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str | None = Field(default=None, max_length=200)


class Signup(BaseModel):
    model_config = ConfigDict(extra="ignore")
    email: str = Field(max_length=254)
    password: str = Field(max_length=1000)
    data: SignupData | None = None


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class SessionOut(Loose):
    id: UUID
    status: Literal["pending", "waiting", "live", "completed", "cancelled"]
    type: Literal["free", "paid"]


class RequestSummary(Loose):
    customer_first_name: str
    vehicle: str
    concern: str
    session_type: Literal["free", "paid"]
    created_at: datetime


class AssignmentOut(Loose):
    id: UUID
    session_id: UUID
    status: Literal[
        "pending_waiver", "queued", "offered", "accepted", "completed", "cancelled", "expired"
    ]
    request_summary: RequestSummary


class SessionAndAssignment(BaseModel):
    session: SessionOut
    assignment: AssignmentOut


class AssignmentList(BaseModel):
    items: list[AssignmentOut]


class SessionList(BaseModel):
    items: list[SessionOut]


class Workshop(BaseModel):
    id: UUID
    name: str


class WorkshopList(BaseModel):
    items: list[Workshop]


class Flag(BaseModel):
    key: str
    enabled: bool
    description: str
    updated_at: datetime


class FlagList(BaseModel):
    items: list[Flag]


class MechanicOut(Loose):
    id: UUID
    display_name: str
    workshop_id: UUID | None
    workshop_name: str | None


class MechanicList(BaseModel):
    items: list[MechanicOut]


class User(Loose):
    id: str
    email: str


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"]
    expires_in: int
    expires_at: int
    refresh_token: str
    user: User


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 422)
}
