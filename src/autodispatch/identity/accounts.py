"""Accounts: creating users, signing in, refreshing tokens, throttling failed sign-ins."""

from __future__ import annotations

import re
from typing import Any
from uuid import UUID

from autodispatch.config import Settings
from autodispatch.db.database import Database, Tx
from autodispatch.domain.errors import (
    BadRequest,
    Forbidden,
    InvalidInput,
    NotAuthenticated,
    NotFound,
    TooManyRequests,
)
from autodispatch.identity.passwords import MAX_LENGTH, MIN_LENGTH, Passwords
from autodispatch.identity.tokens import TokenIssuer, hash_refresh_token, new_refresh_token

ACCOUNT_TYPES = ("customer", "mechanic", "admin")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def normalise_email(email: str) -> str:
    cleaned = email.strip().lower()
    if not _EMAIL.match(cleaned) or len(cleaned) > 254:
        raise InvalidInput(
            f"{email!r} is not an email address like name@example.com", code="invalid_email"
        )
    return cleaned


def check_password(password: str) -> None:
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise InvalidInput(
            f"a password must be {MIN_LENGTH} to {MAX_LENGTH} characters long", code="weak_password"
        )


class Accounts:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.passwords = Passwords(cheap=settings.cheap_password_hashing)
        self.tokens = TokenIssuer(settings.jwt_secret, settings.access_token_ttl_seconds)

    async def create_user(
        self,
        *,
        email: str,
        password: str,
        account_type: str,
        full_name: str,
        workshop: str | None = None,
    ) -> dict[str, Any]:
        """Create an account (and its mechanic record); the workshop is created if new."""
        email = normalise_email(email)
        check_password(password)
        if account_type not in ACCOUNT_TYPES:
            raise InvalidInput(f"account type must be one of {', '.join(ACCOUNT_TYPES)}")
        if workshop is not None and account_type != "mechanic":
            raise InvalidInput("only a mechanic belongs to a workshop", code="invalid_workshop")
        full_name = full_name.strip()
        if not 1 <= len(full_name) <= 200:
            raise InvalidInput("name must be 1 to 200 characters", code="invalid_name")
        password_hash = self.passwords.hash(password)
        async with self.db.as_service() as tx:
            user = await tx.one("insert_user", {"email": email, "password_hash": password_hash})
            assert user is not None
            await tx.one(
                "insert_profile",
                {"id": user["id"], "account_type": account_type, "full_name": full_name},
            )
            result: dict[str, Any] = {**user, "account_type": account_type, "full_name": full_name}
            if account_type == "mechanic":
                workshop_id = None
                if workshop is not None:
                    row = await tx.one("insert_workshop", {"name": workshop.strip()})
                    assert row is not None
                    workshop_id = row["id"]
                mechanic = await tx.one(
                    "insert_mechanic",
                    {"user_id": user["id"], "workshop_id": workshop_id, "display_name": full_name},
                )
                result["mechanic"] = mechanic
        return result

    async def _throttle(self, tx: Tx, keys: list[tuple[str, int]]) -> None:
        for key, limit in keys:
            row = await tx.one(
                "recent_sign_in_failures",
                {"throttle_key": key, "window_seconds": self.settings.sign_in_window_seconds},
            )
            if row is not None and row["failures"] >= limit:
                raise TooManyRequests(
                    "too many failed sign-ins; wait before trying again",
                    code="sign_in_throttled",
                    retry_after=max(1, int(row["retry_after"] or 1)),
                )

    async def sign_in(self, email: str, password: str, address: str) -> dict[str, Any]:
        try:
            email = normalise_email(email)
        except InvalidInput:
            raise BadRequest("invalid login credentials", code="invalid_credentials") from None
        keys = [
            (f"email:{email}", self.settings.sign_in_max_failures_per_account),
            (f"address:{address}", self.settings.sign_in_max_failures_per_address),
        ]
        async with self.db.as_service() as tx:
            await self._throttle(tx, keys)
            user = await tx.one("user_by_email", {"email": email})
        ok = self.passwords.verify(user["password_hash"] if user else None, password)
        if not ok or user is None:
            async with self.db.as_service() as tx:
                for key, _ in keys:
                    await tx.execute("record_sign_in_failure", {"throttle_key": key})
            raise BadRequest("invalid login credentials", code="invalid_credentials")
        _refuse_disabled(user)  # said only to whoever knows the password
        async with self.db.as_service() as tx:
            await tx.execute("clear_sign_in_failures", {"throttle_key": keys[0][0]})
            if self.passwords.needs_rehash(user["password_hash"]):
                await tx.execute(
                    "update_password_hash",
                    {"id": user["id"], "password_hash": self.passwords.hash(password)},
                )
            return await self._session_for(tx, user)

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        async with self.db.as_service() as tx:
            row = await tx.one(
                "use_refresh_token", {"token_hash": hash_refresh_token(refresh_token)}
            )
            if row is None:
                raise BadRequest(
                    "the refresh token is unknown, used or expired; sign in again",
                    code="invalid_refresh_token",
                )
            user = await tx.one("user_by_id", {"id": row["user_id"]})
            if user is None:
                raise NotAuthenticated("this account no longer exists", code="user_gone")
            _refuse_disabled(user)
            return await self._session_for(tx, user)

    async def sign_out(self, user_id: UUID) -> None:
        async with self.db.as_service() as tx:
            await tx.execute("revoke_refresh_tokens", {"user_id": user_id})

    async def user(self, user_id: UUID) -> dict[str, Any]:
        async with self.db.as_service() as tx:
            user = await tx.one("user_by_id", {"id": user_id})
        if user is None:
            raise NotFound("this account no longer exists", code="user_gone")
        return public_user(user)

    async def _session_for(self, tx: Tx, user: dict[str, Any]) -> dict[str, Any]:
        """The token response supabase-js expects."""
        access, expires_at = self.tokens.access_token(
            user_id=user["id"],
            email=user["email"],
            account_type=user["account_type"],
            name=user["full_name"],
        )
        refresh, refresh_hash = new_refresh_token()
        await tx.execute(
            "insert_refresh_token",
            {
                "token_hash": refresh_hash,
                "user_id": user["id"],
                "ttl_seconds": self.settings.refresh_token_ttl_seconds,
            },
        )
        return {
            "access_token": access,
            "token_type": "bearer",
            "expires_in": self.tokens.access_ttl_seconds,
            "expires_at": expires_at,
            "refresh_token": refresh,
            "user": public_user(user),
        }


def _refuse_disabled(user: dict[str, Any]) -> None:
    """A disabled account (auth.users.disabled_at) gets no new tokens; RLS already shows
    its old ones nothing private (its keys are only 'public', migration 0006)."""
    if user.get("disabled_at") is not None:
        raise Forbidden(
            "this account is disabled; ask an administrator to enable it",
            code="account_disabled",
        )


def public_user(user: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(user["id"]),
        "aud": "authenticated",
        "role": "authenticated",
        "email": user["email"],
        "app_metadata": {"provider": "email", "account_type": user["account_type"]},
        "user_metadata": {"name": user["full_name"]},
        "created_at": user["created_at"].isoformat(),
    }
