"""Real services for every test: a fresh Postgres database built by Alembic, Redis, Celery
worker processes, the tiny models. Each test leaves the tables and the queue empty."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from db.session import make_engine, make_session_factory
from posegen import accounts, seeding
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


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


# For a module whose jobs the session's workers and reconciler must not touch: a database of
# its own (override `db_engine` with `module_db_engine` there).
@pytest.fixture(scope="module")
def module_db() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="module")
def module_db_engine(module_db: str) -> Iterator[object]:
    engine = seeded_engine(module_db)
    yield engine
    engine.dispose()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.engine.tiny import build_tiny

    path = tmp_path_factory.mktemp("models")
    build_tiny(path)
    return path


@pytest.fixture(scope="session")
def base_env(
    pg_url: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    var = tmp_path_factory.mktemp("var")
    return {
        "POSEGEN_DATABASE_URL": pg_url,
        "POSEGEN_BROKER_URL": REDIS_URL,
        "POSEGEN_STORAGE_URL": f"file://{var / 'storage'}",
        "POSEGEN_MODEL_DIR": str(model_dir),
        "POSEGEN_VAR_DIR": str(var),
        "POSEGEN_POSE_BACKEND": "mediapipe",
        "POSEGEN_WEBHOOK_ALLOW_PRIVATE": "true",
        "POSEGEN_WEBHOOK_RETRY_SCHEDULE": "0.3,0.3,0.3",
        "POSEGEN_WEBHOOK_SWEEP_INTERVAL": "0.3",
        "POSEGEN_RECONCILE_INTERVAL": "1",
        "POSEGEN_REQUEUE_AFTER_SECONDS": "4",
        "POSEGEN_JOB_LEASE_SECONDS": "3",
        "POSEGEN_HEARTBEAT_SECONDS": "0.3",
        "POSEGEN_RATE_LIMIT_PER_MINUTE": "10000",
        "POSEGEN_LOG_JSON": "true",
        # The GPU-worker way (auto picks it on a GPU): the end-to-end and fault tests run a
        # finished job's record behind the next job; the S3 worker records before returning.
        "POSEGEN_RECORD_BEHIND": "on",
    }


def settings_from(env: dict[str, str]) -> Settings:
    return Settings(**{k.removeprefix("POSEGEN_").lower(): v for k, v in env.items()})  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def settings(base_env: dict[str, str]) -> Settings:
    return settings_from(base_env)


def seeded_engine(database_url: str) -> object:
    engine = make_engine(database_url)
    with Session(engine) as session:
        seeding.seed_models(session)
        seeding.seed_poses(session)
        session.commit()
    return engine


@pytest.fixture(scope="session")
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


@pytest.fixture(autouse=True)
def clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that touched the database or the broker: empty tables and queues."""
    yield
    if "db_engine" in request.fixturenames:
        engine = request.getfixturevalue("db_engine")
        with engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {DATA_TABLES} CASCADE"))
            conn.execute(text("DELETE FROM ai_models WHERE model_key LIKE 'test-%'"))
    if "base_env" in request.fixturenames:  # every fixture that reaches the broker uses it
        redis.Redis.from_url(REDIS_URL).flushdb()


@pytest.fixture
def app(settings: Settings, db_engine: object) -> Iterator[object]:
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(settings)) as client:
        yield client


@dataclass
class Account:
    email: str
    user_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


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


def png_bytes(
    size: tuple[int, int] = (96, 128), color: tuple[int, int, int] = (120, 90, 60)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def astronaut_png() -> bytes:
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="PNG")
    return buf.getvalue()


def submit(
    client: object,
    account: Account,
    *,
    image: bytes | None = None,
    headers: dict[str, str] | None = None,
    files: dict[str, object] | None = None,
    **fields: object,
) -> httpx.Response:
    merged = {"model_key": "tiny-sd15-openpose", "pose_template_id": "standing", **fields}
    data = {k: str(v) for k, v in merged.items() if v is not None}
    upload = {
        "image": ("photo.png", image if image is not None else png_bytes(), "image/png"),
        **(files or {}),
    }
    return client.post(
        "/v1/generations", headers={**account.headers, **(headers or {})}, data=data, files=upload
    )  # type: ignore[attr-defined,no-any-return]


# -- processes ------------------------------------------------------------------------------------


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log = args, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_url = ""

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "posegen.cli.main", *self.args],
            env={**os.environ, **self.env},
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL the whole process group: the Celery parent and its children, at once."""
        self.stop(signal.SIGKILL)

    def tail(self, n: int = 60) -> str:
        return (
            "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
            if self.log.exists()
            else ""
        )


@pytest.fixture(scope="session")
def process_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def gpu_worker(base_env: dict[str, str], db_engine: object, process_logs: Path) -> Iterator[Proc]:
    port = free_port()
    args = ["worker", "--concurrency", "1", "--metrics-port", str(port)]
    proc = Proc(args, base_env, process_logs / "gpu-worker.log").start()
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"
    yield proc
    proc.stop()


def strand(session: Session, job_id: str, *, attempts: int, lease_expired_s: float) -> None:
    """Make a job look claimed `attempts` times by a worker that is gone: processing, with a
    lease that ran out `lease_expired_s` seconds ago (the caller commits)."""
    import datetime as dt

    from sqlalchemy import update

    from db.models import Generation

    session.execute(
        update(Generation)
        .where(Generation.id == job_id)
        .values(
            status="processing",
            worker_id="dead:1",
            attempts=attempts,
            lease_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=lease_expired_s),
        )
    )


@pytest.fixture(scope="session")
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


def wait_for(
    client: object,
    account: Account,
    job_id: str,
    *,
    statuses: tuple[str, ...] = ("completed", "failed", "canceled"),
    timeout: float = 90,
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    job: dict[str, object] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/generations/{job_id}", headers=account.headers).json()  # type: ignore[attr-defined]
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job.get('status')} after {timeout}s")


def start_api(env: dict[str, str], log: Path) -> tuple[Proc, str]:
    """A real uvicorn server in its own process, answering /health; (process, base URL)."""
    port = free_port()
    proc = Proc(["api", "--port", str(port)], env, log).start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.stop()
    raise RuntimeError(proc.tail())


@pytest.fixture(scope="session")
def live_api(base_env: dict[str, str], db_engine: object, process_logs: Path) -> Iterator[str]:
    """A real uvicorn server (its own process), for concurrent clients."""
    proc, base = start_api(base_env, process_logs / "api.log")
    yield base
    proc.stop()


# -- faults ---------------------------------------------------------------------------------------


class TcpProxy:
    """127.0.0.1:<port> -> `target` (Postgres, Redis, an S3 endpoint); `down()` refuses new
    connections and cuts the open ones, `up()` takes them again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None

    def up(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        if self.listener:
            # shutdown() wakes the thread blocked in accept(); close() alone would not.
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self.listener = None
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


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
