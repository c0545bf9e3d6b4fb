"""Engine and session factory, built at start-up (never at import)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker


def make_engine(
    database_url: str, *, pool_size: int = 10, max_overflow: int | None = None
) -> Engine:
    if database_url.startswith("sqlite"):
        path = database_url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            database_url,
            connect_args={"check_same_thread": False, "timeout": 30},
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=2 * pool_size if max_overflow is None else max_overflow,
        # No pre-ping (a round trip on every checkout): a connection found dead fails its
        # request with 503 and SQLAlchemy then discards the whole pool, so the next request
        # connects afresh.
        # Waiting for a free connection is load, not an outage: allow it time. A database that
        # does not answer is caught by the connect timeout instead (-> 503 unavailable).
        pool_timeout=30,
        connect_args={"connect_timeout": 5},
    )


def make_async_engine(
    database_url: str, *, pool_size: int = 10, max_overflow: int | None = None
) -> AsyncEngine:
    """The same database through an asyncio driver (psycopg's async mode, aiosqlite), for a
    route that awaits its query on the event loop instead of hopping to a thread and back
    (the hop costs more than the poll's query). Reads only: autocommit, no BEGIN/ROLLBACK."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(
            url.set(drivername="sqlite+aiosqlite"),
            connect_args={"timeout": 30},
            isolation_level="AUTOCOMMIT",
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        url.set(drivername="postgresql+psycopg"),  # psycopg 3 is sync and async
        pool_size=pool_size,
        max_overflow=2 * pool_size if max_overflow is None else max_overflow,
        pool_timeout=30,
        connect_args={"connect_timeout": 5},
        isolation_level="AUTOCOMMIT",
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # API and worker are separate processes on one file: WAL lets readers and one writer
    # work at once, and busy_timeout makes a writer wait instead of failing.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
