"""Engine and session factory, built at start-up (never at import)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker


def make_engine(
    database_url: str, *, pool_size: int = 10, max_overflow: int | None = None
) -> Engine:
    url = make_url(database_url)
    engine = create_engine(url, **_engine_options(url, pool_size, max_overflow))
    if url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def make_async_engine(
    database_url: str, *, pool_size: int = 10, max_overflow: int | None = None
) -> AsyncEngine:
    """The demo's SQLite database through aiosqlite, for reads only (autocommit: no
    BEGIN/ROLLBACK): the API's hot reads on SQLite (`db.fast.AsyncReads`; on Postgres they run
    on asyncpg connections of their own)."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        raise ValueError("make_async_engine is for SQLite; Postgres reads use db.fast")
    url = url.set(drivername="sqlite+aiosqlite")
    options = _engine_options(url, pool_size, max_overflow)
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT", **options)
    event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def _engine_options(url: URL, pool_size: int, max_overflow: int | None) -> dict[str, Any]:
    """Pool and connect options, the same for the sync engine and SQLite's async one."""
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        return {"connect_args": {"check_same_thread": False, "timeout": 30}}
    return {
        "pool_size": pool_size,
        "max_overflow": 2 * pool_size if max_overflow is None else max_overflow,
        # A connection is pinged when it is checked out: after a restart or failover every
        # pooled connection is dead, and without the ping each would fail one request (503)
        # before the pool learned of it. The ping is a round trip per checkout, not per
        # statement.
        "pool_pre_ping": True,
        # Waiting for a free connection is load, not an outage: allow it time. A database that
        # does not answer is caught by the connect timeout instead (-> 503 unavailable).
        "pool_timeout": 30,
        "connect_args": {"connect_timeout": 5},
    }


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
