"""Hot reads on the asyncio driver's own connection, past SQLAlchemy's execution layer.

The API's two hottest reads (the status poll and the key check in front of every other
route) are single-row SELECTs built once at import. On asyncpg, SQLAlchemy's execution layer
(the adapted cursor, its greenlet hops, the execution context, the Row) cost about as much of
the API's CPU as the round trip itself: 0.42 vs 0.29 ms a poll, in process on the
development VM (README, Performance). `DriverQuery` compiles its statement once per dialect
and runs it with asyncpg's `fetchrow` on the connection SQLAlchemy's pool checked out, applying
the same bind and result processors SQLAlchemy would. On any other driver (aiosqlite: the
demo) it is an ordinary `AsyncConnection.execute`.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine


@asynccontextmanager
async def connect(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """`engine.connect()`, where a database that refuses connections raises OperationalError
    (the API answers 503), as psycopg's does: asyncpg lets the socket's OSError through."""
    conn = engine.connect()
    try:
        await conn.start()
    except (OSError, TimeoutError) as error:
        raise OperationalError("connect", None, error) from error
    try:
        yield conn
    finally:
        await conn.close()


class _Compiled:
    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
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
    """A SELECT of at most one row, run on the driver's connection where that is asyncpg."""

    def __init__(self, statement: Select[Any]) -> None:
        self.statement = statement
        self._compiled: dict[str, _Compiled] = {}

    async def first(self, conn: AsyncConnection, params: Mapping[str, Any]) -> Any:
        """The first row (attributes by column label), or None."""
        dialect = conn.dialect
        if dialect.driver != "asyncpg":
            return (await conn.execute(self.statement, dict(params))).first()
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = _Compiled(self.statement, dialect)
        raw = await conn.get_raw_connection()
        args = compiled.args(params)
        try:
            record = await raw.driver_connection.fetchrow(compiled.sql, *args)  # type: ignore[union-attr]
        except Exception as error:
            raise await _as_sqlalchemy_error(conn, raw, compiled.sql, args, error) from error
        return None if record is None else compiled.row(record)


async def _as_sqlalchemy_error(
    conn: AsyncConnection, raw: Any, sql: str, args: list[Any], error: Exception
) -> Exception:
    """The error SQLAlchemy would have raised: the driver's exception translated to the
    DBAPI's (so the API's handlers answer 503 for a lost database, 422 for a refused value),
    the connection invalidated when it is gone, so the pool replaces it."""
    dialect = conn.dialect
    dbapi_error: Exception = error
    try:
        raw._handle_exception(error)  # the asyncpg adapter raises its DBAPI translation
    except Exception as translated:  # noqa: BLE001 - it raises; what it raises is the answer
        dbapi_error = translated
    invalidated = isinstance(dbapi_error, dialect.loaded_dbapi.Error) and dialect.is_disconnect(
        dbapi_error, raw, None
    )
    if invalidated:
        await conn.invalidate(dbapi_error)
    return DBAPIError.instance(
        sql,
        args,
        dbapi_error,
        dialect.loaded_dbapi.Error,
        connection_invalidated=invalidated,
        dialect=dialect,
    )
