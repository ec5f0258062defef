"""The session and assignment lifecycles: every allowed move, and nothing else.

This module owns the two state machines of DESIGN section 4 as plain data. The
database repeats these tables as a guard (``lifecycle_transitions``, filled by the
first migration); ``tests/domain/test_lifecycle_tables.py`` proves that PostgreSQL
accepts exactly the moves listed here and refuses every other one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class SessionStatus(StrEnum):
    PENDING = "pending"
    WAITING = "waiting"
    LIVE = "live"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class AssignmentStatus(StrEnum):
    PENDING_WAIVER = "pending_waiver"
    QUEUED = "queued"
    OFFERED = "offered"
    ACCEPTED = "accepted"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class InvalidTransition(Exception):
    """A move that the lifecycle table does not allow."""

    def __init__(self, entity: str, from_status: str, to_status: str) -> None:
        self.entity = entity
        self.from_status = from_status
        self.to_status = to_status
        super().__init__(f"{entity} cannot move from '{from_status}' to '{to_status}'")


@dataclass(frozen=True)
class Lifecycle:
    """One state machine: its initial state, final states and allowed moves."""

    entity: str
    initial: str
    moves: Mapping[str, frozenset[str]]

    @property
    def states(self) -> frozenset[str]:
        return frozenset(self.moves)

    @property
    def final(self) -> frozenset[str]:
        return frozenset(state for state, targets in self.moves.items() if not targets)

    def allows(self, from_status: str, to_status: str) -> bool:
        return to_status in self.moves.get(from_status, frozenset())

    def check(self, from_status: str, to_status: str) -> str:
        """Return ``to_status`` if the move is allowed, else raise InvalidTransition."""
        if not self.allows(from_status, to_status):
            raise InvalidTransition(self.entity, from_status, to_status)
        return to_status

    def pairs(self) -> frozenset[tuple[str, str]]:
        return frozenset((a, b) for a, targets in self.moves.items() for b in targets)


_S = SessionStatus
SESSION = Lifecycle(
    entity="session",
    initial=_S.PENDING,
    moves={
        _S.PENDING: frozenset({_S.WAITING, _S.CANCELLED}),
        _S.WAITING: frozenset({_S.LIVE, _S.CANCELLED}),
        _S.LIVE: frozenset({_S.COMPLETED, _S.CANCELLED}),
        _S.COMPLETED: frozenset(),
        _S.CANCELLED: frozenset(),
    },
)

_A = AssignmentStatus
ASSIGNMENT = Lifecycle(
    entity="assignment",
    initial=_A.PENDING_WAIVER,
    moves={
        _A.PENDING_WAIVER: frozenset({_A.QUEUED, _A.CANCELLED}),
        _A.QUEUED: frozenset({_A.OFFERED, _A.ACCEPTED, _A.CANCELLED, _A.EXPIRED}),
        _A.OFFERED: frozenset({_A.QUEUED, _A.ACCEPTED, _A.CANCELLED}),
        _A.ACCEPTED: frozenset({_A.COMPLETED, _A.CANCELLED}),
        _A.COMPLETED: frozenset(),
        _A.CANCELLED: frozenset(),
        _A.EXPIRED: frozenset(),
    },
)

LIFECYCLES: Mapping[str, Lifecycle] = {SESSION.entity: SESSION, ASSIGNMENT.entity: ASSIGNMENT}


def session_end_status(current: str) -> str:
    """Where a session goes when either party ends it.

    A session that never went live is ``cancelled``; a live one is ``completed``.
    """
    if current in SESSION.final:
        raise InvalidTransition("session", current, "ended")
    return SessionStatus.COMPLETED if current == SessionStatus.LIVE else SessionStatus.CANCELLED


def assignment_status_for_session(session_status: str, assignment_status: str) -> str:
    """The assignment status that agrees with a session status (invariant 5).

    Returns the assignment status unchanged when the pair already agrees.
    """
    if session_status == SessionStatus.COMPLETED and assignment_status == _A.ACCEPTED:
        return _A.COMPLETED
    if session_status == SessionStatus.CANCELLED and assignment_status not in ASSIGNMENT.final:
        return _A.CANCELLED
    return assignment_status


# The pairs of (session status, assignment status) that may coexist after any
# transaction. ``ops.audit`` and the tests check every row against it.
CONSISTENT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        (_S.PENDING, _A.PENDING_WAIVER),
        (_S.PENDING, _A.QUEUED),
        (_S.PENDING, _A.OFFERED),
        (_S.WAITING, _A.ACCEPTED),
        (_S.LIVE, _A.ACCEPTED),
        (_S.COMPLETED, _A.COMPLETED),
        (_S.CANCELLED, _A.CANCELLED),
        (_S.CANCELLED, _A.EXPIRED),
    }
)
