"""The API's hot reads, awaited on the event loop: the key check in front of every route and
the status poll, through SQLAlchemy's async engine (asyncpg on Postgres, aiosqlite for the
demo) and its pool.

Every connection is pinged before use (`pool_pre_ping`), so after a database restart or
failover, which leaves each pooled connection dead, the first read on each is not the one
that finds out: it is replaced before the statement runs. A database that refuses
connections raises SQLAlchemy's OperationalError, which the API answers with 503.

A hand-written pool of asyncpg connections stood here before, with SQLAlchemy's statement
compilation and error translation reached through private APIs. Side by side it bought too
little of the status route's requests per second to keep (README, Performance).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

from sqlalchemy import Select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from db.session import make_async_engine

AnySelect: TypeAlias = "Select[*tuple[Any, ...]]"


class AsyncReads:
    """Single-statement reads on the event loop, each on a pooled autocommit connection."""

    def __init__(self, database_url: str, *, pool_size: int) -> None:
        self._engine = make_async_engine(database_url, pool_size=pool_size, max_overflow=0)

    async def close(self) -> None:
        await self._engine.dispose()

    async def first(self, statement: AnySelect, params: Mapping[str, Any]) -> Any:
        """The first row (attributes by column label), or None."""
        async with self._connect(statement, params) as conn:
            return (await conn.execute(statement, dict(params))).first()

    async def all(self, statement: AnySelect, params: Mapping[str, Any]) -> list[Any]:
        async with self._connect(statement, params) as conn:
            return list((await conn.execute(statement, dict(params))).all())

    @asynccontextmanager
    async def _connect(
        self, statement: AnySelect, params: Mapping[str, Any]
    ) -> AsyncIterator[AsyncConnection]:
        """A pooled connection. asyncpg lets a refused or timed-out connect through as the
        socket's own error (psycopg raises OperationalError): it is raised as SQLAlchemy's
        OperationalError here, so that the API answers 503 for it as for any lost database."""
        connection = self._engine.connect()
        try:
            await connection.start()
        except (OSError, TimeoutError) as error:
            raise OperationalError(str(statement), dict(params), error) from error
        try:
            yield connection
        finally:
            await connection.close()
