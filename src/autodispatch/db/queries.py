"""Named SQL queries, loaded once from the ``.sql`` files beside this module.

Each file holds blocks introduced by a ``-- name: <query_name>`` line; parameters are
named (``%(session_id)s``). Keeping SQL in ``.sql`` files lets it be read, grepped and
reviewed as SQL.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """Split a file into its named blocks."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = body.strip()
    return queries


@cache
def load() -> dict[str, str]:
    """Every named query of the package, by name."""
    queries: dict[str, str] = {}
    folder = resources.files("autodispatch.db") / "sql"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        for name, sql in parse(entry.read_text(encoding="utf-8")).items():
            if name in queries:
                raise ValueError(f"query {name!r} is defined in two files")
            queries[name] = sql
    return queries


# A statement that may change a row: plain DML, or a call of the api.* / realtime.*
# functions that write (a few read-only ones are counted too; that costs one idle check).
_WRITES = re.compile(r"\b(insert|update|delete)\b|\b(api|realtime)\.\w+\s*\(", re.IGNORECASE)


@cache
def writes() -> frozenset[str]:
    """The names of the queries that may write: after one commits, the events it may have
    made are waiting for their ids (realtime/sequencer.py)."""
    return frozenset(name for name, sql in load().items() if _WRITES.search(_code(sql)))


def _code(sql: str) -> str:
    """The statement without its comments."""
    return "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
