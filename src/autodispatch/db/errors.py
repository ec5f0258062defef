"""Turn driver errors into our errors, in one place.

The database raises SQLSTATE ``AD<status>`` with a stable code in the HINT (see the
``api.fail`` function of the first migration); constraint violations are named, so
they map to a clear message here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors as pg

from autodispatch.domain import errors

# Constraint name -> (error class, code, message)
_CONSTRAINTS: dict[str, tuple[type[errors.AppError], str, str]] = {
    "users_email_key": (
        errors.Conflict,
        "email_taken",
        "an account with this email already exists",
    ),
    "users_email_normalised": (
        errors.InvalidInput,
        "invalid_email",
        "email must look like name@example.com",
    ),
    "waivers_session_id_key": (
        errors.Conflict,
        "waiver_already_signed",
        "the waiver for this session is already signed",
    ),
    "workshops_name_key": (errors.Conflict, "workshop_exists", "a workshop with this name exists"),
}


def translate(exc: psycopg.Error) -> errors.AppError | None:
    """Our error for a driver error, or None when it is not one we expect."""
    diag = exc.diag
    state = diag.sqlstate or ""
    if state.startswith("AD") and state[2:].isdigit():
        cls = errors.BY_STATUS.get(int(state[2:]), errors.AppError)
        return cls(diag.message_primary or str(exc), code=diag.message_hint or None)
    name = diag.constraint_name
    if name and name in _CONSTRAINTS:
        cls, code, message = _CONSTRAINTS[name]
        return cls(message, code=code)
    if isinstance(exc, pg.CheckViolation | pg.NotNullViolation | pg.StringDataRightTruncation):
        return errors.InvalidInput(
            f"a value was refused by the database ({name or state}): {diag.message_primary}",
            code="invalid_input",
        )
    if isinstance(exc, pg.InvalidTextRepresentation):
        return errors.InvalidInput(
            f"a value has the wrong format: {diag.message_primary}", code="invalid_input"
        )
    return None


@contextmanager
def wrap_errors() -> Iterator[None]:
    """Re-raise expected driver errors as our errors; leave the rest alone."""
    try:
        yield
    except psycopg.Error as exc:
        ours = translate(exc)
        if ours is None:
            raise
        raise ours from exc
