"""The real services the tests run against: where Postgres and Redis are, the Redis databases
lent to test modules, a fresh database built by the migrations, settings from an environment, a
free port."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import redis
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
# suite on the same machine). Its numbered databases are handed out by `RedisDatabases`, one
# holder at a time: no test module names a database number.
REDIS_SERVER = os.environ.get("POSEGEN_TEST_REDIS_SERVER", "redis://127.0.0.1:6379")


REDIS_PORT = int(REDIS_SERVER.rsplit(":", 1)[1])


# What a client that takes messages is doing: blocked in a pop (a Celery worker's BRPOP), or
# subscribed (its remote-control broadcasts).
CONSUMING_COMMANDS = {"brpop", "blpop", "blmove", "brpoplpush", "bzpopmin", "bzpopmax",
                      "subscribe", "psubscribe"}  # fmt: skip


def consumers(url: str) -> list[str]:
    """The clients that consume from the Redis database at `url`, as `address command` (empty
    when no worker listens there)."""
    server, number = url.rsplit("/", 1)
    clients = redis.Redis.from_url(server).client_list()
    return [
        f"{c['addr']} {c['cmd']}"
        for c in clients
        if c["db"] == number and (c["cmd"] in CONSUMING_COMMANDS or {"b", "P"} & set(c["flags"]))
    ]


class RedisDatabases:
    """The numbered databases of the test Redis server, lent one holder at a time: flushed when
    taken and when given back, and only where no process consumes. Database 0, where every
    client of a shared server starts, is never lent; the highest numbers go first."""

    def __init__(self, server: str = REDIS_SERVER, *, settle_s: float = 10.0) -> None:
        self.server = server
        self.settle_s = settle_s
        count = int(redis.Redis.from_url(server).config_get("databases")["databases"])
        self.free = list(range(count - 1, 0, -1))
        self.held: set[int] = set()

    @contextlib.contextmanager
    def take(self) -> Iterator[str]:
        """A database no process consumes, empty, as a URL; flushed again once given back,
        which fails if a process still consumes there (one its holder started and left)."""
        number = self._pick()
        url = self._url(number)
        client = redis.Redis.from_url(url)
        client.flushdb()
        self.held.add(number)
        try:
            yield url
        finally:
            self.held.discard(number)
            left = self._settled(url)
            client.flushdb()
            client.close()
            self.free.append(number)  # back of the line: reused last
            assert left == [], f"still consuming from {url} after its holder ended: {left}"

    def _url(self, number: int) -> str:
        return f"{self.server}/{number}"

    def _pick(self) -> int:
        for number in self.free:
            # Skipped while another run's or a bench's worker listens there.
            if not consumers(self._url(number)):
                self.free.remove(number)
                return number
        raise RuntimeError(
            f"no Redis database left to lend on {self.server}: {len(self.held)} held by this "
            f"run ({sorted(self.held)}), the others consumed by other processes. Raise the "
            "server's `databases`, or take fewer at once."
        )

    def _settled(self, url: str) -> list[str]:
        """The consumers still on `url` once stopped processes had time to disconnect."""
        deadline = time.monotonic() + self.settle_s
        while (left := consumers(url)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left


DATA_TABLES = "api_keys, credit_ledger, webhook_deliveries, idempotency_keys, generations, users"


@contextlib.contextmanager
def fresh_database(*, template: str | None = None) -> Iterator[str]:
    """A new Postgres database built by the Alembic migrations, or copied from `template` (the
    URL of one built so, which nothing may be connected to); dropped afterwards."""
    name = f"posegen_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    copy = f' TEMPLATE "{template.rsplit("/", 1)[1]}"' if template else ""
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"{copy}'))
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    try:
        if template is None:
            upgrade_database(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
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
