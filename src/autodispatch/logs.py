"""Logging: one line per event, JSON for machines, readable for a person at a terminal.

Our code logs through structlog; the standard library's loggers (uvicorn, alembic,
psycopg) go through the same formatter, so every line has the same shape. Values bound
with ``structlog.contextvars`` (the request id, see ``api.observability``) appear on
every line logged while they are bound, whoever logs it. Nothing here runs at import.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

FORMATS = ("auto", "json", "console")


def configure_logging(
    log_format: str = "auto", *, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Send every log line to ``stream`` (stderr): JSON unless ``log_format`` is
    ``console``, or ``auto`` and the stream is a terminal."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    stream = stream or sys.stderr
    as_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    final: list[structlog.typing.Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta
    ]
    if as_json:
        final.append(structlog.processors.dict_tracebacks)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=[*final, renderer])
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Alembic narrates every connection it inspects at INFO; the migrate command reports
    # the revisions it runs itself (cli.progress.alembic_revisions).
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))
