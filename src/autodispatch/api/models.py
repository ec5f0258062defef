"""Request and response bodies. Requests refuse unknown fields and out-of-range values."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, TypeAlias
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)


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


# --- Session chat ----------------------------------------------------------------------


class NewMessage(Strict):
    body: ConcernText = Field(description="1 to 2000 characters; surrounding spaces are dropped")


class Message(BaseModel):
    id: UUID
    session_id: UUID
    sender_id: UUID
    sender_name: str
    sender_role: Literal["customer", "mechanic"]
    body: str
    created_at: datetime


class MessageEnvelope(BaseModel):
    message: Message


class MessageList(BaseModel):
    items: list[Message]


# --- Alert receipts and delivery health ----------------------------------------------

AlertTier: TypeAlias = Literal["toast", "sound", "notification", "title", "favicon"]
AlertTierStatus: TypeAlias = Literal["shown", "failed", "disabled", "unsupported"]
ALERT_TIERS: tuple[AlertTier, ...] = ("toast", "sound", "notification", "title", "favicon")
ALERT_TIER_STATUSES: tuple[AlertTierStatus, ...] = ("shown", "failed", "disabled", "unsupported")


class TierReport(Strict):
    status: AlertTierStatus
    error: Annotated[str, StringConstraints(strip_whitespace=True, max_length=500)] | None = Field(
        default=None, description="Why the tier failed (the exception's message)"
    )


class NewAlertReceipt(Strict):
    """One alert: the event that brought it, or (an alert raised from a queue read, with no
    event in hand) its assignment, whose latest event that made it yours is then used."""

    assignment_id: UUID | None = Field(default=None, description="The alerted request")
    event_id: int | None = Field(
        default=None, ge=1, description="data.event_id of the event that brought the alert"
    )
    tiers: dict[AlertTier, TierReport] = Field(min_length=1)
    commit_to_shown_ms: float | None = Field(default=None, ge=0, le=86_400_000, allow_inf_nan=False)

    @model_validator(mode="after")
    def _names_its_alert(self) -> NewAlertReceipt:
        if self.event_id is None and self.assignment_id is None:
            raise ValueError("a receipt needs event_id (or, without one, assignment_id)")
        return self


class AlertReceipt(BaseModel):
    id: UUID
    mechanic_user_id: UUID
    assignment_id: UUID | None
    event_id: int
    tiers: dict[str, Any]
    commit_to_shown_ms: float | None
    created_at: datetime


class AlertReceiptEnvelope(BaseModel):
    receipt: AlertReceipt


class TierCounts(BaseModel):
    shown: int = 0
    failed: int = 0
    disabled: int = 0
    unsupported: int = 0


class LatencySummary(BaseModel):
    count: int
    p50: float | None
    p95: float | None
    p99: float | None


class AlertFailure(BaseModel):
    tier: str
    error: str | None
    at: datetime
    mechanic: str | None


class AlertHealth(BaseModel):
    window_minutes: int
    tiers: dict[str, TierCounts]
    latency_ms: LatencySummary
    recent_failures: list[AlertFailure]


# --- Web Push ----------------------------------------------------------------------------


class PushKeys(Strict):
    p256dh: str = Field(min_length=1, max_length=200, description="base64url P-256 point")
    auth: str = Field(min_length=1, max_length=100, description="base64url 16-byte secret")


class NewPushSubscription(Strict):
    """A browser's `PushSubscription.toJSON()`."""

    endpoint: str = Field(min_length=1, max_length=2000)
    keys: PushKeys
    expirationTime: float | None = Field(default=None, description="Sent by toJSON(); not used")


class PushSubscriptionOut(BaseModel):
    id: UUID
    endpoint: str
    created_at: datetime


class PushSubscriptionEnvelope(BaseModel):
    subscription: PushSubscriptionOut


class PushEndpoint(Strict):
    endpoint: str = Field(min_length=1, max_length=2000)


class PushPublicKey(BaseModel):
    public_key: str = Field(
        description="The VAPID public key: base64url uncompressed P-256 point, for"
        " pushManager.subscribe({applicationServerKey})"
    )


# --- Probe pings ---------------------------------------------------------------------------


class NewPing(Strict):
    nonce: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)
    ] | (
        None
    ) = Field(default=None, description="Yours to recognise the event; one is made up if absent")


class Ping(BaseModel):
    id: UUID
    user_id: UUID
    nonce: str
    created_at: datetime


class PingEnvelope(BaseModel):
    ping: Ping
