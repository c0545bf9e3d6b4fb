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
    """The same database through an asyncio driver (aiosqlite, asyncpg), reads only:
    autocommit, no BEGIN/ROLLBACK. The API's hot reads use it (`db.fast.AsyncReads`)."""
    url = make_url(database_url)
    sqlite = url.get_backend_name() == "sqlite"
    # asyncpg, not psycopg's async mode: on the status poll it cost 25 % less API CPU a
    # poll (1.50 -> 1.17 ms, side by side under wrk; the README's Performance section).
    url = url.set(drivername="sqlite+aiosqlite" if sqlite else "postgresql+asyncpg")
    options = _engine_options(url, pool_size, max_overflow)
    if not sqlite:
        # Its reads are run again once on a dead connection instead (`db.fast`): no ping.
        options["pool_pre_ping"] = False
        # asyncpg runs every statement prepared. Postgres may then plan it afresh on each
        # execution instead of keeping its generic plan: for the poll at 100,000 queued jobs
        # it did, and a poll cost Postgres 0.31-0.46 ms of CPU instead of 0.08-0.11
        # (`bench.scale`). The hot statements are few and fixed, and
        # `tests/posegen/test_query_plans.py` holds each one's generic plan to its index.
        options["connect_args"]["server_settings"] = {"plan_cache_mode": "force_generic_plan"}
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT", **options)
    if sqlite:
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def _engine_options(url: URL, pool_size: int, max_overflow: int | None) -> dict[str, Any]:
    """Pool and connect options, the same for the sync and the async engine."""
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
        "connect_args": {"timeout" if url.get_driver_name() == "asyncpg" else "connect_timeout": 5},
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
