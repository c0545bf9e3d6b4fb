"""Faults caused for real: a worker SIGKILLed mid-job, Redis flushed, Postgres unreachable.

They run on the module's own database and Redis database (`base_env`), with workers each test
starts and stops: nothing else touches the jobs whose faults are staged here."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, text

from db.models import CreditLedger, Generation, User
from tests.broker_messages import unacked_job_ids, waiting_job_ids
from tests.factories import ledger_kinds, submit, wait_for
from tests.processes import TcpProxy, started_processes
from tests.services import REDIS_PORT, settings_from

pytestmark = pytest.mark.slow


@pytest.fixture
def fault_app(base_env, db_engine):
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(settings_from(base_env))) as client:
        yield client


@pytest.fixture
def procs(base_env, process_logs: Path):
    with started_processes(process_logs, "fault") as start:
        yield lambda *args, name: start(base_env, *args, name=name)


def test_worker_sigkilled_mid_job_completes_once_charged_once(fault_app, make_account, procs, sessions, base_env):  # fmt: skip
    account = make_account(credits=1)
    worker = procs("worker", "--concurrency", "1", name="worker")
    procs("beat", name="beat")
    procs("worker", "--queues", "maintenance", "--concurrency", "1", name="housekeeping")
    # Steps enough to be killed mid-way, few enough for the rerun to end well inside its time
    # limit on a loaded CPU (150 steps ran past it).
    job = submit(fault_app, account, num_inference_steps=20, strength=1.0, seed=11).json()
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
    storage = Path(settings_from(base_env).storage_url.removeprefix("file://"))
    assert [p.name for p in (storage / "outputs" / job["id"]).iterdir()] == ["0.png"]
    assert ledger_kinds(sessions, job["id"]) == {"charge": 1}
    assert fault_app.get("/v1/me", headers=account.headers).json()["credits"] == 0


def test_redis_flushed_with_jobs_queued_all_complete_once(fault_app, base_env, broker_url, make_account, procs, sessions):  # fmt: skip
    """Every message lost: the reconciler publishes each job again, and each runs once (one
    attempt, one output, one charge), however many sweeps ran while the worker started."""
    account = make_account(credits=3)
    ids = [submit(fault_app, account, seed=i).json()["id"] for i in range(3)]
    assert waiting_job_ids(broker_url) == sorted(ids)
    redis.Redis.from_url(broker_url).flushdb()  # every queued message is gone
    worker = procs("worker", "--concurrency", "1", name="worker")
    procs("beat", name="beat")
    procs("worker", "--queues", "maintenance", "--concurrency", "1", name="housekeeping")
    for job_id in ids:
        assert wait_for(fault_app, account, job_id, timeout=120)["status"] == "completed"
    # Until no generation message is left to run (a second one for a job would run now).
    deadline = time.monotonic() + 30
    while waiting_job_ids(broker_url) or unacked_job_ids(broker_url):
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.2)
    storage = Path(settings_from(base_env).storage_url.removeprefix("file://"))
    for job_id in ids:
        done = fault_app.get(f"/v1/generations/{job_id}", headers=account.headers).json()
        assert done["status"] == "completed" and done["attempts"] == 1, (done, worker.tail())
        assert len(done["outputs"]) == 1
        assert [p.name for p in (storage / "outputs" / job_id).iterdir()] == ["0.png"]
        assert ledger_kinds(sessions, job_id) == {"charge": 1}
    assert fault_app.get("/v1/me", headers=account.headers).json()["credits"] == 0


def _waiting_for_a_lock(engine, query: str) -> list[str]:
    """The statements like `query` now waiting for a lock in this database. (A connection of
    their own: within a transaction, pg_stat_activity reads the snapshot of its first use.)"""
    with engine.connect() as conn:
        return list(conn.scalars(text(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE :query"
        ), {"query": query}))  # fmt: skip


def test_database_cut_mid_submit_is_503_stores_nothing_then_recovers(
    base_env, db_engine, make_account, sessions
):
    """Postgres cut while a submit is inside its transaction (its job row and charge written,
    waiting for the user's row): 503 `unavailable`, and nothing of it stays, not the job, not
    the charge, not its uploaded image. Polls on idle pooled connections answer 503 the same
    way, and once Postgres is back submits go through."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    proxy = TcpProxy(("127.0.0.1", 5432))
    proxy.up()
    url = base_env["POSEGEN_DATABASE_URL"].replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    settings = settings_from({**base_env, "POSEGEN_DATABASE_URL": url})
    inputs = Path(settings.storage_url.removeprefix("file://")) / "inputs"
    account = make_account(credits=5)

    def stored() -> dict[str, object]:
        """What the account has in Postgres (straight there, not through the proxy) and the
        inputs in storage."""
        with sessions() as s:
            mine = account.user_id
            return {
                "jobs": s.scalars(select(Generation.id).where(Generation.user_id == mine)).all(),
                "ledger": s.scalars(
                    select(CreditLedger.id).where(CreditLedger.user_id == mine)
                ).all(),
                "credits": s.scalar(select(User.credits).where(User.id == account.user_id)),
                "inputs": sorted(p.name for p in inputs.iterdir()),
            }

    with TestClient(create_app(settings)) as client:
        first = submit(client, account)
        assert first.status_code == 202
        poll = f"/v1/generations/{first.json()['id']}"
        assert client.get(poll, headers=account.headers).status_code == 200  # pools a connection
        before = stored()
        assert before["credits"] == 4 and first.json()["id"] in before["inputs"]
        # The charge's UPDATE waits for the user's row. FOR NO KEY UPDATE lets the job row's
        # and the ledger row's foreign-key checks (KEY SHARE) through, so the submit has
        # written them, and stored its image, by the time it waits.
        # (The lock is taken in the inner block: it is released before the pool waits.)
        with ThreadPoolExecutor(1) as pool, db_engine.connect() as lock:
            lock.execute(select(User.id).where(User.id == account.user_id).with_for_update(key_share=True))  # fmt: skip
            pending = pool.submit(submit, client, account)
            deadline = time.monotonic() + 20
            while not _waiting_for_a_lock(db_engine, "UPDATE users %"):
                assert time.monotonic() < deadline and not pending.done(), "no submit waits"
                time.sleep(0.05)
            proxy.down()
            started = time.monotonic()
            lock.rollback()
            response = pending.result(timeout=20)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "unavailable"
        assert time.monotonic() - started < 10
        # The poll's async connection is just as unavailable, and says so the same way.
        response = client.get(poll, headers=account.headers)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "unavailable"
        assert client.get("/ready").status_code == 503
        assert stored() == before  # no job, no charge, the balance as it was, no file
        proxy.up()
        response = submit(client, account)
        assert response.status_code == 202, response.text
        assert client.get("/v1/me", headers=account.headers).json()["credits"] == 3
        assert client.get(poll, headers=account.headers).status_code == 200
        after = stored()
        assert len(after["jobs"]) == 2 and response.json()["id"] in after["inputs"]
    proxy.down()


def test_broker_down_at_submit_loses_nothing(base_env, broker_url, db_engine, make_account, procs, sessions):  # fmt: skip
    """Redis unreachable from the API: the job is recorded and answered 202 without hanging,
    /ready says the broker is down, and the reconciler publishes the job once it is back
    (nothing else does: the queue is empty when the workers start)."""
    import datetime as dt
    import json

    from fastapi.testclient import TestClient

    from api.app import create_app

    proxy = TcpProxy(("127.0.0.1", REDIS_PORT))
    proxy.up()
    api_env = {
        **base_env,
        "POSEGEN_BROKER_URL": broker_url.replace(str(REDIS_PORT), str(proxy.port)),
    }
    account = make_account(credits=1)
    with TestClient(create_app(settings_from(api_env))) as client:
        proxy.down()
        started = time.monotonic()
        response = submit(client, account)
        assert response.status_code == 202, response.text
        assert time.monotonic() - started < 8
        job_id = response.json()["id"]
        ready = client.get("/ready")
        assert ready.status_code == 503 and not ready.json()["checks"]["broker"]["ok"]
        assert ready.json()["checks"]["database"]["ok"]
        proxy.up()
        assert client.get("/ready").status_code == 200  # the API reaches Redis again
        # Nothing was published, nor is later by the API; the reconciler (beat + maintenance
        # worker) finds the job.
        assert waiting_job_ids(broker_url) == []
        workers_started = dt.datetime.now(dt.UTC)
        worker = procs("worker", "--concurrency", "1", name="worker")
        procs("beat", name="beat")
        housekeeping = procs("worker", "--queues", "maintenance", "--concurrency", "1", name="housekeeping")  # fmt: skip
        done = wait_for(client, account, job_id, timeout=120)
        assert done["status"] == "completed", (done, worker.tail())
        assert done["attempts"] == 1 and len(done["outputs"]) == 1
    proxy.down()
    with sessions() as s:  # the reconciler stamps the job it publishes
        published_at = s.scalar(select(Generation.published_at).where(Generation.id == job_id))
    assert published_at is not None and published_at > workers_started
    logged = [json.loads(line) for line in housekeeping.log.read_text().splitlines() if line.startswith("{")]  # fmt: skip
    # (More than once where the worker took the message before its pool was up: a message a
    # worker holds is not counted as waiting. The claim makes the second one a no-op.)
    assert any(e["msg"] == "reconciled" and e["republished"] for e in logged), housekeeping.tail()
    assert ledger_kinds(sessions, job_id) == {"charge": 1}
