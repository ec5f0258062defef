"""The errors every layer raises: a stable code, an HTTP status and a message that says what to do.

One handler in the API renders any of them as ``{"error": {"code", "message"}}``. The
database raises the same codes itself (SQLSTATE ``AD`` + the HTTP status, the code in
the HINT), and ``db.errors`` turns those into these classes in one place.
"""

from __future__ import annotations

from typing import ClassVar


class AppError(Exception):
    """Something went wrong."""

    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"

    def __init__(self, message: str | None = None, *, code: str | None = None) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.code = code or self.default_code
        super().__init__(self.message)


class BadRequest(AppError):
    """The request could not be read; send valid JSON."""

    status = 400
    default_code = "bad_request"


class NotAuthenticated(AppError):
    """Sign in first: send a valid access token as `Authorization: Bearer <token>`."""

    status = 401
    default_code = "not_authenticated"


class Forbidden(AppError):
    """Your account is not allowed to do this."""

    status = 403
    default_code = "forbidden"


class NotFound(AppError):
    """There is no such thing, or you may not see it."""

    status = 404
    default_code = "not_found"


class Conflict(AppError):
    """The request does not fit the current state."""

    status = 409
    default_code = "conflict"


class InvalidInput(AppError):
    """A field is missing or has a wrong value."""

    status = 422
    default_code = "invalid_input"


class TooManyRequests(AppError):
    """Too many attempts; wait and try again."""

    status = 429
    default_code = "too_many_requests"

    def __init__(
        self, message: str | None = None, *, code: str | None = None, retry_after: int = 60
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class ServiceUnavailable(AppError):
    """The service cannot do this right now."""

    status = 503
    default_code = "unavailable"


BY_STATUS: dict[int, type[AppError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        NotAuthenticated,
        Forbidden,
        NotFound,
        Conflict,
        InvalidInput,
        TooManyRequests,
        ServiceUnavailable,
    )
}
