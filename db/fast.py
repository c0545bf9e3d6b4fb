"""The API's hot reads, awaited on the event loop: the key check in front of every route and
the status poll, through SQLAlchemy's async engine (asyncpg on Postgres, aiosqlite for the
demo) and its pool.

After a database restart or failover every pooled connection is dead. A read that finds its
connection dead is run once more: SQLAlchemy has by then invalidated that connection and
every other one checked out before the failure, so the second try, and every read after it,
gets a new one. Each read is one SELECT in autocommit, so running it again repeats nothing.
This costs nothing while the database is up, where a ping at each checkout
(`pool_pre_ping`, as the sync engine does for its multi-statement transactions) would add a
round trip to every poll. A database that refuses connections raises SQLAlchemy's
OperationalError, which the API answers with 503.

A hand-written pool of asyncpg connections stood here before, with SQLAlchemy's statement
compilation and error translation reached through private APIs. Side by side it bought too
little of the status route's requests per second to keep (README, Performance).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

from sqlalchemy import Select
from sqlalchemy.exc import DBAPIError, OperationalError
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
        try:
            return await self._first(statement, params)
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
            return await self._first(statement, params)  # on a new connection

    async def all(self, statement: AnySelect, params: Mapping[str, Any]) -> list[Any]:
        try:
            return await self._all(statement, params)
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
            return await self._all(statement, params)

    async def _first(self, statement: AnySelect, params: Mapping[str, Any]) -> Any:
        async with self._connect(statement, params) as conn:
            return (await conn.execute(statement, dict(params))).first()

    async def _all(self, statement: AnySelect, params: Mapping[str, Any]) -> list[Any]:
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
