"""The scheduler end to end: a real API process, a real Celery worker serving one model
(`posegen worker --models`), jobs submitted by two users over HTTP, the start order read
back; a model no worker serves waits, and `/ready` says so; a deadline stops a running job."""

from __future__ import annotations

import time

import httpx
import pytest
from sqlalchemy import select

from db.models import CreditLedger
from tests.factories import png_bytes
from tests.processes import start_api, started_processes


@pytest.fixture(scope="module")
def api(base_env, db_engine, process_logs):
    proc, base = start_api(base_env, process_logs / "api-scheduling.log")
    yield base
    proc.stop()


def _submit(api: str, key: str, **fields: object) -> dict:
    form = {"model_key": "tiny-sd15-openpose", "pose_template_id": "standing", **fields}
    response = httpx.post(
        f"{api}/v1/generations",
        headers={"Authorization": f"Bearer {key}"},
        data={k: str(v) for k, v in form.items()},
        files={"image": ("p.png", png_bytes(), "image/png")},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return response.json()


def _get(api: str, key: str, job_id: str) -> dict:
    return httpx.get(
        f"{api}/v1/generations/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=10
    ).json()


def _wait(api: str, key: str, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _get(api, key, job_id)
        if job["status"] in ("completed", "failed", "canceled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"{job_id} still {job['status']}")


def _ready_models(api: str, timeout: float = 30) -> dict:
    """/ready's per-model detail, once the workers have answered."""
    deadline = time.monotonic() + timeout
    while True:
        models = httpx.get(f"{api}/ready", timeout=10).json()["models"]
        if models["tiny-sd15-openpose"]["workers"] or time.monotonic() > deadline:
            return models
        time.sleep(1)


def test_two_users_take_turns_and_a_model_nobody_serves_waits(
    api, base_env, make_account, process_logs
):
    heavy, light = make_account(), make_account()
    # Submitted before any worker runs: the heavy user's backlog first, then the light user's.
    heavies = [_submit(api, heavy.key)["id"] for _ in range(5)]
    lights = [_submit(api, light.key)["id"] for _ in range(2)]
    # Positions as the scheduler will start them: heavy 0, light 1, heavy 2, light 3, ...
    assert [_get(api, heavy.key, j)["queue_position"] for j in heavies] == [0, 2, 4, 5, 6]
    assert [_get(api, light.key, j)["queue_position"] for j in lights] == [1, 3]
    third = make_account()
    unserved = _submit(api, third.key, model_key="tiny-sdxl-openpose")

    with started_processes(process_logs, "scheduling") as start:
        worker = start(
            base_env,
            "worker",
            "--models",
            "tiny-sd15-openpose",
            "--concurrency",
            "1",
            name="worker",
        )
        done = {j: _wait(api, heavy.key, j) for j in heavies}
        done |= {j: _wait(api, light.key, j) for j in lights}
        assert all(job["status"] == "completed" for job in done.values()), worker.tail()
        started = sorted(done, key=lambda j: done[j]["started_at"])
        assert started == [heavies[0], lights[0], heavies[1], lights[1], *heavies[2:]]

        # The SDXL job waits: no worker serves its model, and the operator can see that.
        assert _get(api, third.key, unserved["id"])["status"] == "queued"
        models = _ready_models(api)
        assert models["tiny-sdxl-openpose"] == {"queued": 1, "workers": []}
        assert models["tiny-sd15-openpose"]["queued"] == 0
        assert len(models["tiny-sd15-openpose"]["workers"]) == 1
        metrics = httpx.get(f"{api}/metrics", timeout=10).text
        assert 'posegen_model_workers{model="tiny-sdxl-openpose"} 0.0' in metrics
        assert 'posegen_model_workers{model="tiny-sd15-openpose"} 1.0' in metrics


def test_a_running_job_past_its_deadline_stops_and_is_refunded(
    api, base_env, make_account, sessions, process_logs
):
    account = make_account()
    with started_processes(process_logs, "deadline") as start:
        start(base_env, "worker", "--models", "tiny-sd15-openpose", "--concurrency", "1", name="w")
        # Once the worker runs jobs (a first one done), a job that must finish within a second.
        assert _wait(api, account.key, _submit(api, account.key)["id"])["status"] == "completed"
        # Far more steps than a second allows: the deadline stops it between steps.
        job = _submit(api, account.key, num_inference_steps=150, deadline_seconds=1, strength=1.0)
        done = _wait(api, account.key, job["id"])
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "deadline_exceeded"
    assert done["started_at"] is not None  # it ran, and stopped
    with sessions() as s:
        kinds = s.scalars(
            select(CreditLedger.kind).where(CreditLedger.generation_id == job["id"])
        ).all()
    assert sorted(kinds) == ["charge", "refund"]
    me = httpx.get(
        f"{api}/v1/me", headers={"Authorization": f"Bearer {account.key}"}, timeout=10
    ).json()
    assert me["credits"] == 100 - 1  # the first job's credit; the stopped one's came back
