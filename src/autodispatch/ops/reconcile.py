"""When a session and its assignment disagree: what kind of disagreement, and the pair to
settle on. Pure rules, no I/O; `audit` names the kinds, `repair` applies the targets.

The rule, in order:

1. **Whichever side ended is right; if both ended differently, the session is right.**
   The session is the record of what happened between the customer and the mechanic
   (the first version's bug was a session that ended while its assignment stayed
   queued or accepted, DESIGN section 1, report 2). A completed session needs a
   mechanic: without one nobody can have served it, and both become ``cancelled``.
2. **Neither ended:** an accepted assignment puts its pending session in ``waiting``
   (what the trigger does on accept). A session that is ``waiting``/``live`` while its
   assignment was never accepted keeps its state when it names a mechanic (the
   assignment becomes ``accepted`` by that mechanic); otherwise it goes back to
   ``pending`` and the request stays where it is.

Every target is in ``CONSISTENT_PAIRS`` and settling a consistent pair changes nothing;
``tests/ops/test_reconcile.py`` checks both for every pair of states.
"""

from __future__ import annotations

from dataclasses import dataclass

from autodispatch.domain.lifecycle import (
    ASSIGNMENT,
    CONSISTENT_PAIRS,
    SESSION,
    AssignmentStatus,
    SessionStatus,
)

_S = SessionStatus
_A = AssignmentStatus


@dataclass(frozen=True)
class PairKind:
    code: str
    title: str  # "{n} sessions ..." is prefixed by the audit
    fix: str


PAIR_KINDS: dict[str, PairKind] = {
    kind.code: kind
    for kind in (
        PairKind(
            "ended_session_open_assignment",
            "ended while their assignment did not: they stay in mechanics' queues or look taken",
            "`autodispatch repair --apply`: the assignment follows the session (completed"
            " if a mechanic took it, cancelled otherwise)",
        ),
        PairKind(
            "ended_assignment_open_session",
            "are still open while their assignment ended",
            "`autodispatch repair --apply`: the session follows its assignment (completed"
            " or cancelled)",
        ),
        PairKind(
            "ended_differently",
            "ended one way while their assignment ended another",
            "`autodispatch repair --apply`: the session is right; the assignment is"
            " rewritten to match it",
        ),
        PairKind(
            "accepted_assignment_session_pending",
            "are pending although a mechanic accepted their assignment",
            "`autodispatch repair --apply`: the session moves to waiting with that mechanic",
        ),
        PairKind(
            "unaccepted_assignment_session_started",
            "are waiting or live although their assignment was never accepted (it is"
            " still pending a waiver, queued or offered)",
            "`autodispatch repair --apply`: the assignment becomes accepted by the"
            " session's mechanic, or, when the session names none, the session goes back"
            " to pending",
        ),
    )
}


def pair_kind(session_status: str, assignment_status: str) -> str | None:
    """The kind of disagreement, or None when the pair is consistent.

    Both statuses must be states of their lifecycle (unknown ones are their own finding).
    """
    if (session_status, assignment_status) in CONSISTENT_PAIRS:
        return None
    session_ended = session_status in SESSION.final
    assignment_ended = assignment_status in ASSIGNMENT.final
    if session_ended and assignment_ended:
        return "ended_differently"
    if session_ended:
        return "ended_session_open_assignment"
    if assignment_ended:
        return "ended_assignment_open_session"
    if assignment_status == _A.ACCEPTED:
        return "accepted_assignment_session_pending"
    return "unaccepted_assignment_session_started"


def settle(session_status: str, assignment_status: str, has_mechanic: bool) -> tuple[str, str]:
    """The consistent (session, assignment) pair to repair to.

    ``has_mechanic``: the session or the assignment names a mechanic.
    """
    pair = (session_status, assignment_status)
    if pair in CONSISTENT_PAIRS:
        return pair
    served = (_S.COMPLETED, _A.COMPLETED) if has_mechanic else (_S.CANCELLED, _A.CANCELLED)
    if session_status == _S.COMPLETED:
        return served
    if session_status == _S.CANCELLED:
        return (_S.CANCELLED, _A.CANCELLED)
    if assignment_status == _A.COMPLETED:
        return served  # an assignment completes only with a mechanic (a CHECK says so)
    if assignment_status == _A.EXPIRED:
        return (_S.CANCELLED, _A.EXPIRED)
    if assignment_status == _A.CANCELLED:
        return (_S.CANCELLED, _A.CANCELLED)
    if assignment_status == _A.ACCEPTED:
        return (_S.WAITING, _A.ACCEPTED)  # the session was pending
    # The session is waiting or live; the assignment never got a mechanic.
    if has_mechanic:
        return (session_status, _A.ACCEPTED)
    return (_S.PENDING, assignment_status)


def missing_assignment_pair(
    session_status: str, ready_to_queue: bool, has_mechanic: bool
) -> tuple[str, str]:
    """The pair for a session that has no assignment: the assignment it would have reached
    (queued once the waiver, and the payment of a paid session, are in), then settled
    against the session like any other pair."""
    base = _A.QUEUED if ready_to_queue else _A.PENDING_WAIVER
    return settle(session_status, base, has_mechanic)
