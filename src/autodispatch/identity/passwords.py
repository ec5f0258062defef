"""Password hashing with argon2."""

from __future__ import annotations

from argon2 import PasswordHasher, profiles
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 8
MAX_LENGTH = 128


class Passwords:
    def __init__(self, *, cheap: bool = False) -> None:
        # The cheapest profile exists for the test suite, which creates many accounts.
        self._hasher = PasswordHasher.from_parameters(
            profiles.CHEAPEST if cheap else profiles.RFC_9106_LOW_MEMORY
        )
        # Verified against when the email is unknown, so both paths cost the same.
        self._dummy = self._hasher.hash("not a real password")

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, password_hash: str | None, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash or self._dummy, password) and bool(
                password_hash
            )
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        return self._hasher.check_needs_rehash(password_hash)
