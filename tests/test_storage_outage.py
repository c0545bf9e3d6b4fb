"""Storage outages caused for real: moto_server behind a TCP proxy that is cut (new connections
refused, open ones closed; the objects kept) and restored, with real worker processes.

Storage is a dependency like the database: a submit that cannot store its input answers 503
`unavailable` and charges nothing; a worker that cannot read an input or write an output keeps
retrying for POSEGEN_STORAGE_RETRY_SECONDS, then gives the job back to the queue (an
interruption, counted against POSEGEN_MAX_ATTEMPTS), so a transient outage fails no job."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from sqlalchemy import select

from db.models import CreditLedger, Generation, WebhookDelivery
from tests.factories import Account, ledger_kinds, submit, wait_for
from tests.processes import Proc, TcpProxy, started_processes
from tests.services import settings_from

pytestmark = pytest.mark.slow
BUCKET = "posegen-outage"
AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
RESTARTED = "exiting so that Celery replaces this process"


@pytest.fixture(scope="module")
def s3(moto_server: str) -> Any:
    os.environ.update(AWS)
    client = boto3.client("s3", endpoint_url=moto_server)
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="module")
def proxy(moto_server: str, s3: Any) -> Iterator[TcpProxy]:
    host, port = moto_server.removeprefix("http://").split(":")
    proxy = TcpProxy((host, int(port)))
    proxy.up()
    yield proxy
    proxy.down()


@pytest.fixture(scope="module")
def direct_env(base_env, moto_server, s3) -> dict[str, str]:
    """The API's view, straight to moto_server: submits and polls that the cut never reaches.
    The database and the broker are the module's own (`base_env`), out of other modules'
    reach; its workers are each test's."""
    return {
        **base_env,
        **AWS,
        "POSEGEN_STORAGE_URL": f"s3://{BUCKET}/outage",
        "POSEGEN_S3_ENDPOINT_URL": moto_server,
    }


@pytest.fixture(scope="module")
def proxied_env(direct_env, proxy) -> dict[str, str]:
    """Storage through the proxy: what the cut takes away."""
    return {**direct_env, "POSEGEN_S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}


def _client(env: dict[str, str]) -> Any:
    from fastapi.testclient import TestClient

    from api.app import create_app

    return TestClient(create_app(settings_from(env)))


@pytest.fixture
def procs(process_logs: Path) -> Iterator[Callable[..., Proc]]:
    with started_processes(process_logs, "outage") as start:
        yield start


def _housekeeping(procs: Callable[..., Proc], env: dict[str, str]) -> None:
    """Beat and the reconciler, as in production: they would take back a job left behind."""
    procs(env, "beat", name="beat")
    procs(env, "worker", "--queues", "maintenance", "--concurrency", "1", name="housekeeping")


def _row(sessions, job_id: str) -> Generation:
    with sessions() as s:
        job = s.get_one(Generation, job_id)
        s.expunge(job)
        return job


def _keys(s3: Any, prefix: str) -> list[str]:
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"outage/{prefix}")
    return sorted(o["Key"] for o in listed.get("Contents", []))


def _credits(client: Any, account: Account) -> int:
    return int(client.get("/v1/me", headers=account.headers).json()["credits"])


def test_outage_fails_no_job_in_flight_and_refuses_submits(
    proxied_env, proxy, s3, make_account, procs, sessions
):
    """A 10 s outage while a job runs and two wait: the running job's output is written
    once storage is back, the next job's input read waits it out, nothing fails, nothing
    is refunded, the worker process is not replaced; a submit meanwhile is a 503."""
    env = {**proxied_env, "POSEGEN_RECORD_BEHIND": "on"}  # the GPU way: record beside the next
    worker = procs(env, "worker", "--concurrency", "1", name="worker")
    _housekeeping(procs, env)
    account = make_account(credits=100)
    with _client(env) as client:
        warm = submit(client, account, num_inference_steps=2).json()
        assert wait_for(client, account, warm["id"], timeout=180)["status"] == "completed", (
            worker.tail()
        )
        worker_id = _row(sessions, warm["id"]).worker_id
        # Few steps: on a busy CPU a step of the tiny model can take a second, and the job's
        # time limit is a minute.
        steps = 15
        running = submit(client, account, num_inference_steps=steps, strength=1.0, seed=1).json()
        waiting = [submit(client, account, num_inference_steps=4, seed=i).json() for i in (2, 3)]
        ids = [running["id"], *(job["id"] for job in waiting)]

        def reach(n: int) -> tuple[float, int]:
            while True:
                job = client.get(f"/v1/generations/{running['id']}", headers=account.headers).json()  # fmt: skip
                assert job["status"] in ("queued", "processing"), (job, worker.tail())
                if (at := int(job["progress"]["step"] or 0)) >= n:
                    return time.monotonic(), at
                time.sleep(0.05)

        # Cut about 3 s before the running job's last step (paced on this machine), so that
        # its output is due, and the next job's input is read, while storage is gone.
        t1, s1 = reach(2)
        t2, s2 = reach(s1 + 3)
        reach(steps - max(1, round(3 * (s2 - s1) / (t2 - t1))))
        before = _credits(client, account)

        proxy.down()
        cut = time.monotonic()
        refused = submit(client, account, seed=9)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "unavailable"
        assert int(refused.headers["Retry-After"]) > 0
        assert time.monotonic() - cut < 8
        assert _credits(client, account) == before
        # What the worker met while storage was gone: the running job done with its steps but
        # not recorded (its output could not be written), the next one claimed (its input
        # could not be read), none of them finished.
        seen: dict[str, set[str]] = {job_id: set() for job_id in ids}
        finished_steps = False
        while time.monotonic() - cut < 10:
            for job_id in ids:
                job = client.get(f"/v1/generations/{job_id}", headers=account.headers).json()
                seen[job_id].add(job["status"])
                if job_id == running["id"] and job["progress"]["step"] == steps:
                    finished_steps = finished_steps or job["status"] == "processing"
            time.sleep(0.2)
        proxy.up()

        assert finished_steps, (seen, worker.tail())
        assert "processing" in seen[ids[1]], (seen, worker.tail())
        assert all(seen[job_id] <= {"queued", "processing"} for job_id in ids), seen
        done = [wait_for(client, account, job_id, timeout=120) for job_id in ids]
        assert [job["status"] for job in done] == ["completed"] * 3, (done, worker.tail())
        for job in done:
            assert len(job["outputs"]) == 1, job
            assert ledger_kinds(sessions, job["id"]) == {"charge": 1}, job
            assert _keys(s3, f"outputs/{job['id']}/") == [f"outage/outputs/{job['id']}/0.png"]
            # The same worker process ran them all: an outage is no reason to replace it.
            assert _row(sessions, job["id"]).worker_id == worker_id
        assert RESTARTED not in worker.tail(400)
    with sessions() as s:  # the refused submit left nothing behind
        jobs = s.scalars(select(Generation).where(Generation.user_id == account.user_id)).all()
        assert sorted(j.id for j in jobs) == sorted([warm["id"], *ids])
        ledger = s.scalars(select(CreditLedger).where(CreditLedger.user_id == account.user_id)).all()  # fmt: skip
        assert sorted((e.kind, e.generation_id) for e in ledger if e.kind != "grant") == sorted(
            ("charge", j.id) for j in jobs
        )
        spent = sum(j.credit_cost for j in jobs)
    # Every input stored belongs to a job (those of finished jobs may be removed already).
    assert {key.split("/")[2] for key in _keys(s3, "inputs/")} <= {j.id for j in jobs}
    with _client(env) as client:
        assert _credits(client, account) == 100 - spent


@pytest.fixture(scope="module")
def impatient_worker(proxied_env, db_engine, process_logs: Path) -> Iterator[Proc]:
    """A worker that gives a job back after 1 s without storage, three attempts a job."""
    env = {**proxied_env, "POSEGEN_STORAGE_RETRY_SECONDS": "1", "POSEGEN_MAX_ATTEMPTS": "3"}
    proc = Proc(["worker", "--concurrency", "1"], env, process_logs / "outage-impatient.log")
    yield proc.start()
    proc.stop()


def _attempts_at_least(client: Any, account: Account, job_id: str, n: int) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/generations/{job_id}", headers=account.headers).json()  # fmt: skip
        if job["attempts"] >= n or job["status"] in ("completed", "failed", "canceled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not at attempt {n}")


def test_job_given_back_while_storage_is_down_completes_once_it_is_back(
    direct_env, impatient_worker, proxy, s3, make_account, sessions
):
    account = make_account(credits=10)
    with _client(direct_env) as client:
        proxy.down()
        try:
            job = submit(client, account).json()
            # The first attempt cannot read the input: given back, not failed, and claimed again.
            second = _attempts_at_least(client, account, job["id"], 2)
        finally:
            proxy.up()
        assert second["status"] in ("queued", "processing"), (second, impatient_worker.tail())
        assert ledger_kinds(sessions, job["id"]) == {"charge": 1}
        done = wait_for(client, account, job["id"], timeout=120)
        assert done["status"] == "completed", (done, impatient_worker.tail())
        assert 2 <= done["attempts"] <= 3 and len(done["outputs"]) == 1, done
        assert ledger_kinds(sessions, job["id"]) == {"charge": 1}
        assert _credits(client, account) == 10 - _row(sessions, job["id"]).credit_cost
        assert _keys(s3, f"outputs/{job['id']}/") == [f"outage/outputs/{job['id']}/0.png"]
    assert RESTARTED not in impatient_worker.tail(400)


def test_job_fails_once_storage_stayed_down_for_every_attempt(
    direct_env, impatient_worker, proxy, s3, make_account, sessions
):
    account = make_account(credits=10)
    with _client(direct_env) as client:
        proxy.down()
        try:
            job = submit(client, account, webhook_url="http://127.0.0.1:9/hook").json()
            done = wait_for(client, account, job["id"], timeout=120)
        finally:
            proxy.up()
        assert done["status"] == "failed", (done, impatient_worker.tail())
        assert done["error"]["code"] == "internal_error", done
        assert "storage" in done["error"]["message"].lower(), done
        assert done["attempts"] == 3 and done["outputs"] == [], done
        assert ledger_kinds(sessions, job["id"]) == {"charge": 1, "refund": 1}
        assert _credits(client, account) == 10
    with sessions() as s:
        events = s.scalars(select(WebhookDelivery.event_type).where(WebhookDelivery.generation_id == job["id"])).all()  # fmt: skip
    assert events == ["generation.failed"]
    assert _keys(s3, f"outputs/{job['id']}/") == []
    assert RESTARTED not in impatient_worker.tail(400)
