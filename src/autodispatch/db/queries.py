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
