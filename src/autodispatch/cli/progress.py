"""Feedback for long-running commands (bench, repair, migrate), on stderr.

- ``Steps``: a command made of steps. A spinner shows the step under way and its
  elapsed time; each finished step is printed with how long it took, so a log of the
  run (a pipe, CI) shows the same steps without the spinner.
- ``Bars``: work with a known size (rows to repair): one progress bar per kind of work,
  shown once it is large enough to wait for.
- ``alembic_revisions``: turns Alembic's "Running upgrade A -> B" into steps.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

BAR_MIN_ROWS = 100  # below this a bar would only flicker


class Steps:
    def __init__(self, console: Console, first: str | None = None) -> None:
        self.console = console
        self.first = first
        self.started = time.monotonic()
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._task: TaskID | None = None
        self._step: str | None = None
        self._step_started = 0.0

    def __enter__(self) -> Steps:
        self.started = time.monotonic()
        self._progress.start()
        if self.first:
            self(self.first)
        return self

    def __call__(self, step: str) -> None:
        """Finish the step under way (printing it) and start ``step``."""
        self._finish()
        self._step = step
        self._step_started = time.monotonic()
        if self._task is None:
            self._task = self._progress.add_task(step, total=None)
        else:
            self._progress.reset(self._task, description=step, total=None)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _finish(self) -> None:
        if self._step is not None:
            took = time.monotonic() - self._step_started
            self._progress.console.print(f"[dim]… {self._step} ({took:.1f} s)[/dim]")
            self._step = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self._finish()
        elif self._step is not None:
            self._progress.console.print(f"[red]… {self._step}: failed[/red]")
        self._progress.stop()


class Bars:
    """Implements ``ops.repair.Progress``."""

    def __init__(self, console: Console, min_total: int = BAR_MIN_ROWS) -> None:
        self.console = console
        self.min_total = min_total
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def start(self, code: str, title: str, total: int) -> None:
        if total < self.min_total:
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
        self._tasks[code] = self._progress.add_task(title, total=total)

    def advance(self, code: str, n: int) -> None:
        if self._progress is not None and code in self._tasks:
            self._progress.advance(self._tasks[code], n)

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


@contextlib.contextmanager
def alembic_revisions(step: Callable[[str], None]) -> Iterator[None]:
    """Call ``step`` with each revision Alembic starts applying (it logs "Running upgrade
    0003 -> 0004, <description>" on this logger, at INFO)."""
    logger = logging.getLogger("alembic.runtime.migration")

    class ToSteps(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("Running "):
                step(message.removeprefix("Running ").strip())

    handler = ToSteps()
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
