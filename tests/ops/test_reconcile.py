"""The pure rules repair follows: every disagreeing pair settles on a consistent one."""

from __future__ import annotations

import itertools

import pytest

from autodispatch.domain.lifecycle import ASSIGNMENT, CONSISTENT_PAIRS, SESSION
from autodispatch.ops.reconcile import PAIR_KINDS, missing_assignment_pair, pair_kind, settle

ALL_PAIRS = sorted(itertools.product(sorted(SESSION.states), sorted(ASSIGNMENT.states)))


@pytest.mark.parametrize("has_mechanic", [True, False])
@pytest.mark.parametrize(("session", "assignment"), ALL_PAIRS)
def test_every_pair_settles_on_a_consistent_one(
    session: str, assignment: str, has_mechanic: bool
) -> None:
    """Whatever the pair, the target is consistent, and settling it again changes nothing."""
    target = settle(session, assignment, has_mechanic)
    assert target in CONSISTENT_PAIRS
    assert settle(*target, has_mechanic) == target
    if (session, assignment) in CONSISTENT_PAIRS:
        assert target == (session, assignment)
        assert pair_kind(session, assignment) is None
    else:
        assert pair_kind(session, assignment) in PAIR_KINDS


def test_an_ended_session_is_right_and_a_completed_one_needs_a_mechanic() -> None:
    """Report 2 of the first version: completed sessions whose assignment stayed open."""
    assert settle("completed", "accepted", True) == ("completed", "completed")
    assert settle("completed", "queued", True) == ("completed", "completed")
    assert settle("completed", "queued", False) == ("cancelled", "cancelled")
    assert settle("cancelled", "offered", False) == ("cancelled", "cancelled")
    assert settle("cancelled", "completed", True) == ("cancelled", "cancelled")
    assert pair_kind("completed", "accepted") == "ended_session_open_assignment"
    assert pair_kind("completed", "cancelled") == "ended_differently"


def test_an_open_session_follows_its_ended_or_accepted_assignment() -> None:
    """The session follows an assignment that ended or was accepted, as the triggers would."""
    assert settle("waiting", "expired", True) == ("cancelled", "expired")
    assert settle("live", "completed", True) == ("completed", "completed")
    assert settle("pending", "accepted", True) == ("waiting", "accepted")
    assert settle("live", "queued", True) == ("live", "accepted")
    assert settle("waiting", "offered", False) == ("pending", "offered")
    assert pair_kind("live", "queued") == "unaccepted_assignment_session_started"
    assert pair_kind("pending", "accepted") == "accepted_assignment_session_pending"
    assert pair_kind("waiting", "expired") == "ended_assignment_open_session"


def test_a_missing_assignment_gets_the_state_its_session_implies() -> None:
    """Queued when the waiver (and payment) are in, pending_waiver before, settled after."""
    assert missing_assignment_pair("pending", True, False) == ("pending", "queued")
    assert missing_assignment_pair("pending", False, False) == ("pending", "pending_waiver")
    assert missing_assignment_pair("waiting", True, True) == ("waiting", "accepted")
    assert missing_assignment_pair("completed", True, True) == ("completed", "completed")
    assert missing_assignment_pair("cancelled", False, False) == ("cancelled", "cancelled")
