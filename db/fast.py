"""The API's hot reads, awaited on the event loop: the key check in front of every route and
the status poll. On Postgres they run on asyncpg connections of the API's own (`_Pool`), each
a statement compiled once (`DriverQuery`); elsewhere (aiosqlite: the demo) on SQLAlchemy's
async engine.

Why a pool of its own: side by side under wrk (`python -m bench.api`, trees in turn), the
status route served about a fifth more requests a second with it than through asyncpg's pool
(its acquire and release bookkeeping) and about half as many again as through SQLAlchemy's
async engine (its execution layer, a greenlet hop per checkout); figures in
docs/performance.md. What SQLAlchemy did for these reads is done with public APIs: the
statement's SQL and parameter order from its compiler, the values asyncpg cannot take as they
are (UUIDs, JSON) by asyncpg codecs, the rows' attribute access by a record class, and the
errors that mean the database is gone raised as SQLAlchemy's OperationalError, which the API
answers 503.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import asyncpg
from sqlalchemy import Select, make_url
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

AnySelect: TypeAlias = "Select[*tuple[Any, ...]]"

# asyncpg runs every statement prepared. Postgres may then plan it afresh on each execution
# instead of keeping its generic plan: for the poll at a long queue it did, and a poll cost
# Postgres several times the CPU (`bench.scale`). The statements here
# are few and fixed, and `tests/posegen/test_query_plans.py` holds each one's generic plan to
# its index, so these connections always take the generic plan.
_SERVER_SETTINGS = {"plan_cache_mode": "force_generic_plan"}

# What tells that the database, or the connection to it, is gone: the socket's errors, a
# closed connection, a server that is starting, shutting down or full, a backend terminated.
_GONE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


class DriverQuery:
    """A SELECT for `AsyncReads`: the SQL and parameter order asyncpg takes, from
    SQLAlchemy's compiler for asyncpg, compiled on first use."""

    def __init__(self, statement: AnySelect) -> None:
        self.statement = statement
        self._compiled: Any = None

    def sql_and_args(self, params: Mapping[str, Any]) -> tuple[str, list[Any]]:
        if self._compiled is None:
            self._compiled = self.statement.compile(dialect=asyncpg_dialect.dialect())
        values = self._compiled.construct_params(params)
        return self._compiled.string, [values[name] for name in self._compiled.positiontup]


class _Row(asyncpg.Record):  # type: ignore[misc]
    """A record whose columns read as attributes too, as SQLAlchemy's rows do."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


async def _codecs(connection: asyncpg.Connection) -> None:
    """UUIDs as strings and JSON decoded, as the SQLAlchemy models read them."""
    await connection.set_type_codec(
        "uuid", encoder=str, decoder=str, schema="pg_catalog", format="text"
    )
    for name in ("json", "jsonb"):
        await connection.set_type_codec(
            name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


class _Pool:
    """At most `size` asyncpg connections, opened when first needed and reused last in,
    first out: a semaphore and a list. Every read is one statement in autocommit, so a
    returned connection holds no session state to reset.

    After a restart or failover every idle connection is dead. asyncpg marks a connection
    closed as soon as the server's end of its socket closes, so one found closed is dropped
    and the next taken (a new one opened if none is left): no request after the database is
    back fails, and nothing is paid while it is up (a ping at each checkout would add a round
    trip to every poll). A connection whose statement raised is closed, not reused."""

    def __init__(self, dsn: str, size: int) -> None:
        self._dsn = dsn
        self._slots = asyncio.Semaphore(size)
        self._idle: list[asyncpg.Connection] = []

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(
            self._dsn, timeout=5, server_settings=_SERVER_SETTINGS, record_class=_Row
        )
        try:
            await _codecs(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _take(self) -> asyncpg.Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
        return await self._connect()

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._slots:
            conn = await self._take()
            reusable = False
            try:
                yield conn
                reusable = not conn.is_closed()
            finally:
                if reusable:
                    self._idle.append(conn)
                else:
                    conn.terminate()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close(timeout=5)


class AsyncReads:
    """Single-statement reads on the event loop. `first` / `all` take a `DriverQuery`."""

    def __init__(self, database_url: str, *, pool_size: int) -> None:
        url = make_url(database_url)
        self._pool: _Pool | None = None
        self._engine: AsyncEngine | None = None
        self._pool_size = pool_size
        if url.get_backend_name() == "postgresql":
            self._dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        else:
            from db.session import make_async_engine

            self._engine = make_async_engine(database_url, pool_size=pool_size, max_overflow=0)

    async def start(self) -> None:
        # No connection at start-up: an API that starts while the database is down answers
        # 503 until it is back, instead of not starting.
        if self._engine is None:
            self._pool = _Pool(self._dsn, self._pool_size)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        if self._engine is not None:
            await self._engine.dispose()

    async def first(self, query: DriverQuery, params: Mapping[str, Any]) -> Any:
        """The first row (attributes by column label), or None."""
        if self._engine is not None:
            async with self._engine.connect() as conn:
                return (await conn.execute(query.statement, dict(params))).first()
        return await self._run("fetchrow", query, params)

    async def all(self, query: DriverQuery, params: Mapping[str, Any]) -> list[Any]:
        if self._engine is not None:
            async with self._engine.connect() as conn:
                return list((await conn.execute(query.statement, dict(params))).all())
        return list(await self._run("fetch", query, params))

    async def _run(self, method: str, query: DriverQuery, params: Mapping[str, Any]) -> Any:
        assert self._pool is not None, "AsyncReads.start() was not awaited"
        sql, args = query.sql_and_args(params)
        try:
            async with self._pool.acquire() as conn:
                return await getattr(conn, method)(sql, *args)
        except _GONE as error:
            raise OperationalError(sql, dict(params), error) from error
