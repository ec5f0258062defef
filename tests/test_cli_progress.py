"""Feedback on long commands: steps with their times, bars for large repairs."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from autodispatch.cli.progress import Bars, Steps, alembic_revisions


def console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=120, force_terminal=False), buffer


def test_steps_print_each_finished_step_with_its_time() -> None:
    """Each step is printed once it ends, with its duration; a failed one says so."""
    c, buffer = console()
    with Steps(c, "starting serve") as steps:
        steps("race phase")
    text = buffer.getvalue()
    assert "… starting serve (" in text and "… race phase (" in text
    assert text.index("starting serve") < text.index("race phase")
    c, buffer = console()
    with pytest.raises(RuntimeError), Steps(c) as steps:
        steps("baseline phase")
        raise RuntimeError("stop")
    assert "baseline phase: failed" in buffer.getvalue()


def test_bars_appear_only_for_work_worth_waiting_for() -> None:
    """Below the threshold no bar is made; above it, the bar counts the rows."""
    c, _ = console()
    with Bars(c, min_total=100) as bars:
        bars.start("small", "few rows", 5)
        bars.advance("small", 5)
        assert bars._progress is None
        bars.start("big", "many rows", 500)
        bars.advance("big", 200)
        assert bars._progress is not None
        assert bars._progress.tasks[0].completed == 200


def test_alembic_revisions_become_steps() -> None:
    """Alembic's "Running upgrade A -> B, doc" lines are turned into steps; nothing else."""
    seen: list[str] = []
    logger = logging.getLogger("alembic.runtime.migration")
    with alembic_revisions(seen.append):
        logger.info("Context impl PostgresqlImpl.")
        logger.info("Running %s %s", "upgrade", "0003 -> 0004, Operations")
    logger.info("Running %s %s", "upgrade", "0004 -> 0005, later")
    assert seen == ["upgrade 0003 -> 0004, Operations"]
