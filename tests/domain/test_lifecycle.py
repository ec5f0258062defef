"""The pure lifecycle tables."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autodispatch.domain.lifecycle import (
    ASSIGNMENT,
    CONSISTENT_PAIRS,
    SESSION,
    AssignmentStatus,
    InvalidTransition,
    SessionStatus,
    assignment_status_for_session,
    session_end_status,
)


def test_final_states_have_no_moves() -> None:
    """Completed, cancelled and expired are final: nothing leaves them."""
    assert SESSION.final == {"completed", "cancelled"}
    assert ASSIGNMENT.final == {"completed", "cancelled", "expired"}


def test_illegal_move_names_both_states_and_changes_nothing() -> None:
    """An illegal move raises an error naming the entity and both states."""
    with pytest.raises(InvalidTransition) as err:
        ASSIGNMENT.check("completed", "queued")
    assert "'completed'" in str(err.value) and "'queued'" in str(err.value)
    assert "assignment" in str(err.value)


@given(st.sampled_from(sorted(SESSION.states)))
def test_end_is_completed_only_when_live(status: str) -> None:
    """Ending a session that never went live cancels it; a live one completes."""
    if status in SESSION.final:
        with pytest.raises(InvalidTransition):
            session_end_status(status)
        return
    end = session_end_status(status)
    assert end == ("completed" if status == "live" else "cancelled")
    assert SESSION.allows(status, end)


@given(st.sampled_from(sorted(SESSION.states)), st.sampled_from(sorted(ASSIGNMENT.states)))
def test_sync_rule_lands_on_a_consistent_pair_when_session_ends(
    session_status: str, assignment_status: str
) -> None:
    """After a session ends, the synced assignment status agrees with it, via a legal move."""
    if session_status not in SESSION.final:
        return
    synced = assignment_status_for_session(session_status, assignment_status)
    if synced != assignment_status:
        assert ASSIGNMENT.allows(assignment_status, synced)
    if (session_status, assignment_status) in {
        ("completed", "accepted"),
        ("cancelled", "accepted"),
        ("cancelled", "queued"),
        ("cancelled", "offered"),
        ("cancelled", "pending_waiver"),
    }:
        assert (session_status, synced) in CONSISTENT_PAIRS


def test_every_status_is_reachable_from_the_initial_state() -> None:
    """No status in either table is unreachable (a typo would make one)."""
    for lifecycle in (SESSION, ASSIGNMENT):
        seen = {lifecycle.initial}
        frontier = [lifecycle.initial]
        while frontier:
            for nxt in lifecycle.moves[frontier.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        assert seen == lifecycle.states


def test_enums_match_tables() -> None:
    """The enums list exactly the states of the tables."""
    assert {s.value for s in SessionStatus} == SESSION.states
    assert {s.value for s in AssignmentStatus} == ASSIGNMENT.states
