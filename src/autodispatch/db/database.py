"""The connection pool, and transactions that run as the caller.

Every request runs in one transaction. For a user, the transaction first switches to
the non-owner role of the token (``authenticated`` or ``anon``) and sets its claims, so
row-level security decides every read, whatever the route does. The service
transaction (sign-in, webhooks, background work) runs as the owner.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from autodispatch.db import queries
from autodispatch.db.errors import wrap_errors
from autodispatch.domain.principal import Principal

_ROLES = frozenset({"anon", "authenticated"})


class Tx:
    """One open transaction: run named queries from ``db/sql``."""

    def __init__(self, conn: psycopg.AsyncConnection[DictRow]) -> None:
        self.conn = conn
        self._queries = queries.load()
        self._writes = queries.writes()
        self.wrote = False  # ran a query that may write (see Database.on_write_commit)

    async def all(self, name: str, params: Mapping[str, Any] | None = None) -> list[DictRow]:
        self.wrote = self.wrote or name in self._writes
        with wrap_errors():
            cur = await self.conn.execute(self._queries[name], params or {})
            return await cur.fetchall()

    async def one(self, name: str, params: Mapping[str, Any] | None = None) -> DictRow | None:
        self.wrote = self.wrote or name in self._writes
        with wrap_errors():
            cur = await self.conn.execute(self._queries[name], params or {})
            return await cur.fetchone()

    async def value(self, name: str, params: Mapping[str, Any] | None = None) -> Any:
        row = await self.one(name, params)
        if row is None:
            return None
        return next(iter(row.values()))

    async def execute(self, name: str, params: Mapping[str, Any] | None = None) -> int:
        """Run a statement; return the number of rows it touched."""
        self.wrote = self.wrote or name in self._writes
        with wrap_errors():
            cur = await self.conn.execute(self._queries[name], params or {})
            return cur.rowcount


class Database:
    """A pool of connections to one PostgreSQL database."""

    def __init__(self, url: str, *, min_size: int = 2, max_size: int = 20) -> None:
        self.url = url
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[DictRow]] = AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            open=False,
            kwargs={"row_factory": dict_row, "autocommit": False},
            name="autodispatch",
        )
        # Called after a transaction that ran a writing query has committed: the app
        # wires it to the sequencer, which gives the events made there their ids.
        self.on_write_commit: Callable[[], None] | None = None

    async def open(self) -> None:
        await self.pool.open(wait=True, timeout=30)

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def as_principal(self, principal: Principal) -> AsyncIterator[Tx]:
        """A transaction in which row-level security sees ``principal``."""
        if principal.role not in _ROLES:
            raise ValueError(f"unknown database role {principal.role!r}")
        async with self.pool.connection() as conn:
            async with conn.transaction():
                await conn.execute(
                    "select set_config('role', %s, true),"
                    " set_config('request.jwt.claims', %s, true)",
                    (principal.role, json.dumps(principal.claims, default=str)),
                )
                tx = Tx(conn)
                yield tx
            self._committed(tx)

    @asynccontextmanager
    async def as_service(self) -> AsyncIterator[Tx]:
        """A transaction as the owner: for sign-in, webhooks and background work."""
        async with self.pool.connection() as conn:
            async with conn.transaction():
                tx = Tx(conn)
                yield tx
            self._committed(tx)

    def _committed(self, tx: Tx) -> None:
        if tx.wrote and self.on_write_commit is not None:
            self.on_write_commit()
