"""Real services for every test: Postgres databases built by Alembic, Redis, Celery worker
processes, the tiny models. Each module that uses them gets a database and a Redis database of
its own, and its processes stop when it ends: no module's workers or reconciler reach another
module's jobs. Each test leaves the tables and the queue empty."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import tenacity
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from db.session import make_session_factory
from posegen import accounts
from posegen.settings import Settings
from tests.factories import Account
from tests.processes import Proc, start_api
from tests.services import (
    DATA_TABLES,
    RedisDatabases,
    consumers,
    free_port,
    fresh_database,
    seeded_engine,
    settings_from,
)


@pytest.fixture(scope="session")
def migrated_database() -> Iterator[str]:
    """Built by the migrations once; each module's database is a copy of it."""
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="module")
def database_url(migrated_database: str) -> Iterator[str]:
    """This module's own Postgres database."""
    with fresh_database(template=migrated_database) as url:
        yield url


@pytest.fixture(scope="session")
def redis_databases() -> RedisDatabases:
    return RedisDatabases()


@pytest.fixture(scope="module")
def broker_url(redis_databases: RedisDatabases) -> Iterator[str]:
    """This module's own Redis database: the broker of its API and of the workers it starts."""
    with redis_databases.take() as url:
        yield url


@pytest.fixture(scope="module")
def quiet_broker_url(redis_databases: RedisDatabases) -> Iterator[str]:
    """A Redis database of this module that no process consumes: what is published there stays
    for the test to read. No worker fixture is given it, and `clean` checks after each test that
    no consumer came."""
    with redis_databases.take() as url:
        yield url


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.engine.tiny import build_tiny

    path = tmp_path_factory.mktemp("models")
    build_tiny(path)
    return path


@pytest.fixture(scope="module")
def base_env(
    database_url: str,
    broker_url: str,
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    var = tmp_path_factory.mktemp("var")
    return {
        "POSEGEN_DATABASE_URL": database_url,
        "POSEGEN_BROKER_URL": broker_url,
        "POSEGEN_STORAGE_URL": f"file://{var / 'storage'}",
        "POSEGEN_MODEL_DIR": str(model_dir),
        "POSEGEN_VAR_DIR": str(var),
        "POSEGEN_POSE_BACKEND": "mediapipe",
        "POSEGEN_WEBHOOK_ALLOW_PRIVATE": "true",
        "POSEGEN_WEBHOOK_RETRY_SCHEDULE": "0.3,0.3,0.3",
        "POSEGEN_WEBHOOK_SWEEP_INTERVAL": "0.3",
        "POSEGEN_WEBHOOK_PROGRESS_INTERVAL": "0.6",
        "POSEGEN_RECONCILE_INTERVAL": "1",
        "POSEGEN_REQUEUE_AFTER_SECONDS": "4",
        "POSEGEN_JOB_LEASE_SECONDS": "3",
        "POSEGEN_HEARTBEAT_SECONDS": "0.3",
        "POSEGEN_RATE_LIMIT_PER_MINUTE": "10000",
        # Tests queue many jobs with no worker to take them; the limits have tests of their own.
        "POSEGEN_MAX_QUEUED_PER_USER": "0",
        "POSEGEN_LOG_JSON": "true",
        # The GPU-worker way (auto picks it on a GPU): the end-to-end and fault tests run a
        # finished job's record behind the next job; the S3 worker records before returning.
        "POSEGEN_RECORD_BEHIND": "on",
    }


@pytest.fixture(scope="module")
def settings(base_env: dict[str, str]) -> Settings:
    return settings_from(base_env)


@pytest.fixture(scope="module")
def db_engine(settings: Settings) -> Iterator[object]:
    engine = seeded_engine(settings.database_url)
    yield engine
    engine.dispose()  # type: ignore[attr-defined]


@pytest.fixture
def sessions(db_engine: object) -> object:
    return make_session_factory(db_engine)  # type: ignore[arg-type]


@pytest.fixture
def session(sessions: object) -> Iterator[Session]:
    s: Session = sessions()  # type: ignore[operator]
    yield s
    s.rollback()
    s.close()


# The module's worker may still be claiming or finishing a job when a test ends: Postgres can
# pick the TRUNCATE as a deadlock's victim, and the next try finds the worker done.
@tenacity.retry(
    retry=tenacity.retry_if_exception_type(OperationalError),
    stop=tenacity.stop_after_attempt(5),
    wait=tenacity.wait_fixed(0.5),
    reraise=True,
)
def _empty_tables(engine: Any) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {DATA_TABLES} CASCADE"))
        conn.execute(text("DELETE FROM ai_models WHERE model_key LIKE 'test-%'"))


@pytest.fixture(autouse=True)
def clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that touched the database or a broker: empty tables and queues."""
    yield
    if "db_engine" in request.fixturenames:
        _empty_tables(request.getfixturevalue("db_engine"))
    if "broker_url" in request.fixturenames:
        redis.Redis.from_url(request.getfixturevalue("broker_url")).flushdb()
    if "quiet_broker_url" in request.fixturenames:
        quiet = request.getfixturevalue("quiet_broker_url")
        assert consumers(quiet) == [], f"a process consumes from the quiet broker {quiet}"
        redis.Redis.from_url(quiet).flushdb()


@pytest.fixture
def app(settings: Settings, db_engine: object) -> Iterator[object]:
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def make_account(sessions: object) -> object:
    def make(*, tier: str = "free", credits: int = 100) -> Account:
        with sessions() as session:  # type: ignore[operator]
            email = f"user-{uuid.uuid4().hex[:10]}@example.com"
            user = accounts.create_user(session, email=email, tier=tier, credits=credits)
            raw = accounts.create_key(session, email=email).raw
            session.commit()
            return Account(email=email, user_id=user.id, key=raw)

    return make


# -- processes ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def process_logs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp(f"logs-{Path(request.node.name).stem}")


# The processes below are the module's: on its database and broker, stopped when it ends.


@pytest.fixture(scope="module")
def gpu_worker(base_env: dict[str, str], db_engine: object, process_logs: Path) -> Iterator[Proc]:
    port = free_port()
    args = ["worker", "--concurrency", "1", "--metrics-port", str(port)]
    proc = Proc(args, base_env, process_logs / "gpu-worker.log").start()
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def housekeeping(base_env: dict[str, str], db_engine: object, process_logs: Path) -> Iterator[Proc]:
    port = free_port()
    worker = Proc(
        [
            "worker",
            "--queues",
            "webhooks,maintenance",
            "--concurrency",
            "2",
            "--metrics-port",
            str(port),
        ],
        base_env,
        process_logs / "housekeeping.log",
    ).start()
    worker.metrics_url = f"http://127.0.0.1:{port}/metrics"
    beat = Proc(["beat"], base_env, process_logs / "beat.log").start()
    yield worker
    beat.stop()
    worker.stop()


@pytest.fixture(scope="module")
def live_api(base_env: dict[str, str], db_engine: object, process_logs: Path) -> Iterator[str]:
    """A real uvicorn server (its own process), for concurrent clients."""
    proc, base = start_api(base_env, process_logs / "api.log")
    yield base
    proc.stop()


# -- faults ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    """A real S3 endpoint on loopback (moto_server); its base URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(url, timeout=0.5)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(timeout=10)
