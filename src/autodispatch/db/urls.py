"""Connection URLs."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from psycopg.conninfo import make_conninfo


def with_database(url: str, name: str) -> str:
    """The same server, another database; keeps a ``postgresql://`` URL a URL."""
    parts = urlsplit(url)
    if parts.scheme in ("postgresql", "postgres"):
        return urlunsplit(parts._replace(path="/" + name))
    return make_conninfo(url, dbname=name)
