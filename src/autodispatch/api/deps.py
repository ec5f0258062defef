"""What routes need from the app: the services, and who is calling."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from autodispatch.config import Settings
from autodispatch.db.database import Database
from autodispatch.domain.errors import Forbidden, NotAuthenticated
from autodispatch.domain.principal import ANONYMOUS, Principal
from autodispatch.identity.accounts import Accounts
from autodispatch.identity.tokens import TokenIssuer
from autodispatch.metrics import Metrics


@dataclass
class Services:
    settings: Settings
    db: Database
    accounts: Accounts
    metrics: Metrics
    anon_key: str
    expected_revision: str

    @property
    def tokens(self) -> TokenIssuer:
        return self.accounts.tokens


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthenticated(
                "the Authorization header must be 'Bearer <access token>'", code="invalid_token"
            )
        return token.strip()
    return request.query_params.get("access_token")


def principal(request: Request) -> Principal:
    """The caller: a verified token's user, or anonymous when no token is sent."""
    token = bearer_token(request)
    if token is None:
        return ANONYMOUS
    return services(request).tokens.principal(token)


def user(request: Request) -> Principal:
    """The caller, who must be signed in."""
    caller = principal(request)
    if caller.is_anonymous:
        raise NotAuthenticated()
    return caller


def admin(request: Request) -> Principal:
    caller = user(request)
    if caller.account_type != "admin":
        raise Forbidden("only admin accounts may do this", code="wrong_role")
    return caller
