"""The real services the tests run against: where Postgres and Redis are, a fresh database
built by the migrations, settings from an environment, a free port."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from db.session import make_engine
from posegen import seeding
from posegen.cli.common import upgrade_database
from posegen.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


PG_ADMIN = os.environ.get(
    "POSEGEN_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


# The test Redis server (POSEGEN_TEST_REDIS_SERVER, e.g. another port for a second run of the
# suite on the same machine); each module that must not share a queue takes a DB of its own.
REDIS_SERVER = os.environ.get("POSEGEN_TEST_REDIS_SERVER", "redis://127.0.0.1:6379")


REDIS_PORT = int(REDIS_SERVER.rsplit(":", 1)[1])


def redis_db(number: int) -> str:
    return f"{REDIS_SERVER}/{number}"


REDIS_URL = redis_db(15)


DATA_TABLES = "api_keys, credit_ledger, webhook_deliveries, idempotency_keys, generations, users"


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new Postgres database built by the Alembic migrations, dropped afterwards."""
    name = f"posegen_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    upgrade_database(url)
    yield url
    with admin.connect() as conn:
        conn.execute(
            text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


def settings_from(env: dict[str, str]) -> Settings:
    return Settings(**{k.removeprefix("POSEGEN_").lower(): v for k, v in env.items()})  # type: ignore[arg-type]


def seeded_engine(database_url: str) -> object:
    engine = make_engine(database_url)
    with Session(engine) as session:
        seeding.seed_models(session)
        seeding.seed_poses(session)
        session.commit()
    return engine


def free_port() -> int:

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
