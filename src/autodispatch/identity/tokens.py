"""HS256 access tokens in the shape Supabase clients expect (``sub``, ``role``, ``exp``)."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from typing import Any

import jwt

from autodispatch.domain.errors import NotAuthenticated
from autodispatch.domain.principal import ANONYMOUS, Principal

AUDIENCE = "authenticated"
_ALGORITHM = "HS256"
_ANON_KEY_TTL = 10 * 365 * 24 * 3600


class TokenIssuer:
    def __init__(self, secret: str, access_ttl_seconds: int) -> None:
        if len(secret) < 32:
            raise ValueError("the JWT secret must be at least 32 characters")
        self._secret = secret
        self.access_ttl_seconds = access_ttl_seconds

    def access_token(
        self,
        *,
        user_id: uuid.UUID,
        email: str,
        account_type: str,
        name: str,
        now: float | None = None,
    ) -> tuple[str, int]:
        """A signed access token for a user and its expiry (unix seconds)."""
        issued = int(now if now is not None else time.time())
        expires = issued + self.access_ttl_seconds
        claims = {
            "sub": str(user_id),
            "role": "authenticated",
            "aud": AUDIENCE,
            "email": email,
            "iat": issued,
            "exp": expires,
            "app_metadata": {"provider": "email", "account_type": account_type},
            "user_metadata": {"name": name},
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM), expires

    def anon_key(self) -> str:
        """The public key realtime and REST clients send as ``apikey``."""
        issued = int(time.time())
        claims = {
            "role": "anon",
            "iss": "autodispatch",
            "iat": issued,
            "exp": issued + _ANON_KEY_TTL,
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def decode(self, token: str) -> dict[str, Any]:
        """The verified claims of a token; NotAuthenticated says what is wrong with it."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                options={"require": ["exp", "role"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise NotAuthenticated(
                "the access token has expired; refresh it or sign in again", code="token_expired"
            ) from None
        except jwt.InvalidTokenError as exc:
            raise NotAuthenticated(
                f"the access token is not valid ({exc}); sign in again", code="invalid_token"
            ) from None
        if claims.get("role") not in ("anon", "authenticated"):
            raise NotAuthenticated("the token has an unknown role", code="invalid_token")
        return claims

    def principal(self, token: str) -> Principal:
        claims = self.decode(token)
        if claims["role"] == "anon":
            return ANONYMOUS
        try:
            user_id = uuid.UUID(str(claims.get("sub")))
        except ValueError:
            raise NotAuthenticated("the token names no user", code="invalid_token") from None
        app_meta = claims.get("app_metadata") or {}
        return Principal(
            user_id=user_id,
            role="authenticated",
            account_type=app_meta.get("account_type"),
            email=claims.get("email"),
            claims=claims,
        )


def new_refresh_token() -> tuple[str, str]:
    """A refresh token and the hash we store (the token itself is never stored)."""
    token = secrets.token_urlsafe(32)
    return token, hash_refresh_token(token)


def hash_refresh_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
