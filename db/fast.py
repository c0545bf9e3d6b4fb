"""The API's hot reads, awaited on the event loop: an asyncpg pool on Postgres, past
SQLAlchemy's execution layer and its async pool.

The status poll and the key check in front of every other route are SELECTs built once at
import (`DriverQuery`). CPU per poll statement in one process on the development VM
(`python -m bench.floor --pools`, three runs): 0.36-0.43 ms through SQLAlchemy's async
engine, 0.23-0.29 ms with asyncpg's `fetchrow` on a connection that engine's pool checked
out, 0.20-0.28 ms through asyncpg's default pool, 0.18 ms through `AsyncReads`, 0.09-0.13 ms
on a connection held by the caller. What the pools add is a greenlet hop at checkout and
check-in (SQLAlchemy's), and a reset query on every release plus 0.07 ms of bookkeeping
(asyncpg's). So on Postgres `AsyncReads` keeps its own few connections (`_Pool`: a semaphore
and a list; every read here is one statement in autocommit, with no session state to undo),
runs each query with `fetchrow`/`fetch`,
and applies the bind and result processors SQLAlchemy would (UUIDs as strings, UTC
datetimes, JSON decoded). Driver errors become SQLAlchemy's (the API answers 503 for a
database that is gone). Elsewhere (aiosqlite: the demo) it is SQLAlchemy's async engine.
"""

from __future__ import annotations

import asyncio
import json
from collections import namedtuple
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

from sqlalchemy import Select, make_url
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

AnySelect: TypeAlias = "Select[*tuple[Any, ...]]"

# asyncpg runs every statement prepared. Postgres may then plan it afresh on each execution
# instead of keeping its generic plan: for the poll at 100,000 queued jobs it did, and a poll
# cost Postgres 0.31-0.46 ms of CPU instead of 0.08-0.11 (`bench.scale`'s table). The
# statements here are few and fixed, and `tests/posegen/test_query_plans.py` holds each
# one's generic plan to its index, so these connections always take the generic plan.
_SERVER_SETTINGS = {"plan_cache_mode": "force_generic_plan"}


class _Compiled:
    """A statement compiled once for asyncpg: SQL with $n placeholders, and the processors
    SQLAlchemy applies to its binds and to each result column."""

    def __init__(self, statement: AnySelect, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.compiled = compiled
        self.sql = str(compiled)
        self.positions: tuple[str, ...] = tuple(compiled.positiontup or ())
        self.bind_processors: Mapping[str, Any] = compiled._bind_processors
        columns = compiled._result_columns
        self.row_type: Any = namedtuple("Row", [c[0] for c in columns], rename=True)  # type: ignore[misc]
        self.result_processors: list[Callable[[Any], Any] | None] = [
            c[3]._cached_result_processor(dialect, None) for c in columns
        ]

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        values = self.compiled.construct_params(params)
        args = []
        for name in self.positions:
            value = values[name]
            process = self.bind_processors.get(name)
            args.append(process(value) if process is not None and value is not None else value)
        return args

    def row(self, record: Any) -> Any:
        return self.row_type._make(
            value if process is None else process(value)
            for process, value in zip(self.result_processors, record, strict=True)
        )


class DriverQuery:
    """A SELECT for `AsyncReads`, compiled for asyncpg on first use."""

    _dialect = asyncpg_dialect.dialect()

    def __init__(self, statement: AnySelect) -> None:
        self.statement = statement
        self._compiled: _Compiled | None = None

    @property
    def compiled(self) -> _Compiled:
        if self._compiled is None:
            self._compiled = _Compiled(self.statement, self._dialect)
        return self._compiled


class _Pool:
    """At most `size` asyncpg connections, opened when first needed and reused last-in
    first-out. asyncpg's own pool costs 0.07 ms of CPU an acquire and release, on top of its
    reset query (`python -m bench.floor --pools`); this one a semaphore and a list. A
    connection whose statement raised (or was cancelled) is closed, not reused: the next
    request opens a new one, which is how a restarted database is recovered from. Every read
    here is one statement in autocommit, so a returned connection holds no session state."""

    def __init__(self, dsn: str, size: int) -> None:
        self._dsn = dsn
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Any] = []

    async def _connect(self) -> Any:
        import asyncpg

        conn = await asyncpg.connect(self._dsn, timeout=5, server_settings=_SERVER_SETTINGS)
        try:
            await _json_codecs(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
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


async def _json_codecs(connection: Any) -> None:
    for name in ("json", "jsonb"):
        await connection.set_type_codec(
            name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


class AsyncReads:
    """Single-statement reads on the event loop. `first` / `all` take a `DriverQuery`."""

    def __init__(self, database_url: str, *, pool_size: int) -> None:
        url = make_url(database_url)
        self._pool: Any = None
        self._engine: AsyncEngine | None = None
        if url.get_backend_name() == "postgresql":
            self._dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
            self._pool_size = pool_size
        else:
            from db.session import make_async_engine

            self._engine = make_async_engine(database_url, pool_size=pool_size, max_overflow=0)

    async def start(self) -> None:
        # No connection at start-up: an API that starts while the database is down answers
        # 503 until it is back, like the sync engine, instead of not starting.
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
        compiled = query.compiled
        async with self._driver_errors(compiled, params) as conn:
            record = await conn.fetchrow(compiled.sql, *compiled.args(params))
        return None if record is None else compiled.row(record)

    async def all(self, query: DriverQuery, params: Mapping[str, Any]) -> list[Any]:
        if self._engine is not None:
            async with self._engine.connect() as conn:
                return list((await conn.execute(query.statement, dict(params))).all())
        compiled = query.compiled
        async with self._driver_errors(compiled, params) as conn:
            records = await conn.fetch(compiled.sql, *compiled.args(params))
        return [compiled.row(record) for record in records]

    @asynccontextmanager
    async def _driver_errors(
        self, compiled: _Compiled, params: Mapping[str, Any]
    ) -> AsyncIterator[Any]:
        """A pooled connection; asyncpg's errors raised as SQLAlchemy's would be."""
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except (OSError, TimeoutError) as error:  # refused, reset, or no answer in time
            raise OperationalError(compiled.sql, dict(params), error) from error
        except Exception as error:
            raise _as_sqlalchemy_error(compiled.sql, params, error) from error


def _as_sqlalchemy_error(sql: str, params: Mapping[str, Any], error: Exception) -> Exception:
    """SQLAlchemy's translation of an asyncpg error: its DBAPI class (OperationalError for a
    lost connection, DataError for a refused value...), `connection_invalidated` when the
    connection is gone (`_Pool` has closed it already)."""
    dbapi = asyncpg_dialect.AsyncAdapt_asyncpg_dbapi(__import__("asyncpg"))
    dialect = asyncpg_dialect.dialect(dbapi=dbapi)  # is_disconnect reads the DBAPI's classes
    translated: Exception = error
    try:
        asyncpg_dialect.AsyncAdapt_asyncpg_connection._handle_exception_no_connection(dbapi, error)
    except Exception as raised:  # noqa: BLE001 - it raises; what it raises is the answer
        translated = raised
    if not isinstance(translated, dbapi.Error):
        return error
    return DBAPIError.instance(
        sql,
        dict(params),
        translated,
        dbapi.Error,
        connection_invalidated=dialect.is_disconnect(translated, None, None),
        dialect=dialect,
    )
