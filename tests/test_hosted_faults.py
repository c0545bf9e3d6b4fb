"""A remote worker SIGKILLed while its hosted job waits on the provider: the reconciler takes
the job back once its lease runs out and publishes it on the `remote` queue, where a new
remote worker runs it to completion, once, charged once. Real processes (remote workers, beat,
the maintenance worker) and the loopback Inference API (posegen.loopback)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from posegen.loopback import Answer, LoopbackProvider
from tests.factories import eventually, ledger_kinds, submit, wait_for
from tests.processes import started_processes
from tests.services import settings_from

TOKEN = "hf_loopback_secret_faults_42"
MODEL = "sd15-openpose-hf"  # 3 credits
pytestmark = pytest.mark.slow


@pytest.fixture
def provider() -> Iterator[LoopbackProvider]:
    server = LoopbackProvider(token=TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def fault_app(base_env, db_engine):
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(settings_from(base_env))) as client:
        yield client


@pytest.fixture
def procs(base_env, process_logs: Path, provider: LoopbackProvider):
    env = {**base_env, "POSEGEN_HF_API_URL": provider.url, "POSEGEN_HF_API_TOKEN": TOKEN}
    with started_processes(process_logs, "hosted-fault") as start:
        yield lambda *args, name: start(env, *args, name=name)


def test_a_remote_worker_killed_mid_job_is_replaced_and_the_job_completes_once(
    fault_app, make_account, procs, provider, base_env, sessions
):
    # The first request hangs past the kill; the one after it answers the image at once.
    provider.script.append(Answer(delay=20))
    account = make_account(credits=10)
    first = procs("worker", "--queues", "remote", name="remote")
    procs("beat", name="beat")
    procs("worker", "--queues", "maintenance", "--concurrency", "1", name="housekeeping")
    response = submit(fault_app, account, model_key=MODEL)
    assert response.status_code == 202, response.text
    job = response.json()
    assert eventually(lambda: provider.in_flight == 1, timeout=60), first.tail()
    first.kill()  # SIGKILL: no hand-back, no failure recorded, the lease just stops
    time.sleep(1)
    url = f"/v1/generations/{job['id']}"
    killed = fault_app.get(url, headers=account.headers).json()
    assert killed["status"] == "processing" and killed["attempts"] == 1, killed
    # Only a remote worker can take it back: the reconciler's message must go to `remote`.
    second = procs("worker", "--queues", "remote", name="remote2")
    done = wait_for(fault_app, account, job["id"], timeout=90)
    assert done["status"] == "completed", (done, second.tail())
    assert done["attempts"] == 2 and len(done["outputs"]) == 1, done
    assert len(provider.received) == 2  # the hung request, and the second worker's
    storage = Path(settings_from(base_env).storage_url.removeprefix("file://"))
    assert [p.name for p in (storage / "outputs" / job["id"]).iterdir()] == ["0.png"]
    assert ledger_kinds(sessions, job["id"]) == {"charge": 1}
    assert fault_app.get("/v1/me", headers=account.headers).json()["credits"] == 7
