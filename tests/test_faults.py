"""Faults caused for real: a worker SIGKILLed mid-job, Redis flushed, Postgres unreachable."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from db.models import CreditLedger, Generation
from tests.conftest import (
    REDIS_PORT,
    Proc,
    TcpProxy,
    redis_db,
    settings_from,
    submit,
    wait_for,
)

pytestmark = pytest.mark.slow
FAULT_BROKER = redis_db(13)  # its own queue, consumed only by this module's workers


# This module runs on its own database and Redis DB: the session's workers and reconciler
# must not touch the jobs whose faults are staged here.
@pytest.fixture(scope="module")
def fault_db(module_db):
    return module_db


@pytest.fixture(scope="module")
def db_engine(module_db_engine):
    return module_db_engine


@pytest.fixture
def fault_env(base_env, fault_db):
    return {**base_env, "POSEGEN_DATABASE_URL": fault_db, "POSEGEN_BROKER_URL": FAULT_BROKER}


@pytest.fixture
def fault_app(fault_env, db_engine):
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(settings_from(fault_env))) as client:
        yield client
    redis.Redis.from_url(FAULT_BROKER).flushdb()


@pytest.fixture
def procs(fault_env, process_logs: Path):
    started: list[Proc] = []

    def start(*args: str, name: str) -> Proc:
        log = process_logs / f"fault-{name}-{time.monotonic_ns()}.log"
        proc = Proc(list(args), fault_env, log).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def _ledger(sessions, job_id: str) -> dict[str, int]:
    with sessions() as s:
        rows = s.execute(select(CreditLedger.kind, func.count()).where(CreditLedger.generation_id == job_id).group_by(CreditLedger.kind)).all()  # fmt: skip
    return dict(rows)  # type: ignore[arg-type]


def test_worker_sigkilled_mid_job_completes_once_charged_once(fault_app, make_account, procs, sessions, fault_env):  # fmt: skip
    account = make_account(credits=1)
    worker = procs("worker", "--concurrency", "1", name="worker")
    procs("beat", name="beat")
    procs("worker", "--queues", "maintenance", "--concurrency", "1", name="housekeeping")
    job = submit(fault_app, account, num_inference_steps=150, strength=1.0, seed=11).json()
    wait_for(fault_app, account, job["id"], statuses=("processing",), timeout=60)
    while fault_app.get(f"/v1/generations/{job['id']}", headers=account.headers).json()["progress"]["step"] < 2:  # fmt: skip
        time.sleep(0.05)
    worker.kill()  # SIGKILL to the Celery parent and its child at once
    time.sleep(1)
    killed = fault_app.get(f"/v1/generations/{job['id']}", headers=account.headers).json()
    assert killed["status"] == "processing", (killed, worker.tail())
    worker2 = procs("worker", "--concurrency", "1", name="worker2")
    done = wait_for(fault_app, account, job["id"], timeout=120)
    assert done["status"] == "completed", (done, worker2.tail())
    # The kill cost one attempt; the second ran it to completion, once.
    assert done["attempts"] == 2 and len(done["outputs"]) == 1, done
    storage = Path(settings_from(fault_env).storage_url.removeprefix("file://"))
    assert [p.name for p in (storage / "outputs" / job["id"]).iterdir()] == ["0.png"]
    assert _ledger(sessions, job["id"]) == {"charge": 1}
    assert fault_app.get("/v1/me", headers=account.headers).json()["credits"] == 0


def test_redis_flushed_with_jobs_queued_all_complete(fault_app, make_account, procs):
    account = make_account()
    ids = [submit(fault_app, account, seed=i).json()["id"] for i in range(3)]
    redis.Redis.from_url(FAULT_BROKER).flushdb()  # every queued message is gone
    procs("worker", "--concurrency", "1", name="worker")
    procs("beat", name="beat")
    procs("worker", "--queues", "maintenance", "--concurrency", "1", name="housekeeping")
    for job_id in ids:
        assert wait_for(fault_app, account, job_id, timeout=120)["status"] == "completed"


def test_database_refusing_connections_is_503_then_recovers(
    fault_env, db_engine, make_account, sessions
):
    from fastapi.testclient import TestClient

    from api.app import create_app

    proxy = TcpProxy(("127.0.0.1", 5432))
    proxy.up()
    url = fault_env["POSEGEN_DATABASE_URL"].replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    account = make_account(credits=5)
    with TestClient(create_app(settings_from({**fault_env, "POSEGEN_DATABASE_URL": url}))) as client:  # fmt: skip
        first = submit(client, account)
        assert first.status_code == 202
        poll = f"/v1/generations/{first.json()['id']}"
        assert client.get(poll, headers=account.headers).status_code == 200  # pools a connection
        proxy.down()
        started = time.monotonic()
        response = submit(client, account)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "unavailable"
        assert time.monotonic() - started < 10
        # The poll's async connection is just as unavailable, and says so the same way.
        response = client.get(poll, headers=account.headers)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "unavailable"
        assert client.get("/ready").status_code == 503
        with sessions() as s:  # straight to Postgres: nothing charged, nothing recorded
            assert s.scalar(select(func.count()).select_from(Generation).where(Generation.user_id == account.user_id)) == 1  # fmt: skip
        proxy.up()
        response = submit(client, account)
        assert response.status_code == 202, response.text
        assert client.get("/v1/me", headers=account.headers).json()["credits"] == 3
        assert client.get(poll, headers=account.headers).status_code == 200
    proxy.down()


def test_broker_down_at_submit_loses_nothing(fault_env, db_engine, make_account, procs):
    """Redis unreachable from the API: the job is recorded and answered 202 without hanging,
    /ready says the broker is down, and the reconciler publishes the job once it is back."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    proxy = TcpProxy(("127.0.0.1", REDIS_PORT))
    proxy.up()
    api_env = {**fault_env, "POSEGEN_BROKER_URL": FAULT_BROKER.replace(str(REDIS_PORT), str(proxy.port))}
    account = make_account(credits=1)
    with TestClient(create_app(settings_from(api_env))) as client:
        proxy.down()
        started = time.monotonic()
        response = submit(client, account)
        assert response.status_code == 202, response.text
        assert time.monotonic() - started < 8
        ready = client.get("/ready")
        assert ready.status_code == 503 and not ready.json()["checks"]["broker"]["ok"]
        assert ready.json()["checks"]["database"]["ok"]
        proxy.up()
        # Nothing was published; the reconciler (beat + maintenance worker) finds the job.
        procs("worker", "--concurrency", "1", name="worker")
        procs("beat", name="beat")
        procs("worker", "--queues", "maintenance", "--concurrency", "1", name="housekeeping")
        done = wait_for(client, account, response.json()["id"], timeout=120)
        assert done["status"] == "completed"
        assert client.get("/ready").status_code == 200
    proxy.down()
