"""Batches through the whole stack: the API, Postgres, Redis and a real Celery worker process
with POSEGEN_MAX_BATCH=4 on the tiny models. Several outputs per job (charged per image,
each equal to its seed's job alone), and several jobs in one pipeline call, each with its
own progress, cancel, failure, refund, outputs and webhook events."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select, text

from db.models import WebhookDelivery
from tests.factories import astronaut_png, eventually, ledger_kinds, submit, wait_for
from tests.processes import Proc
from tests.services import free_port

pytestmark = pytest.mark.slow
HOOK = "http://127.0.0.1:9/hook"
TINY = "tiny-sd15-openpose"  # deliveries are recorded whether or not anyone listens


@pytest.fixture
def batch_worker(
    base_env: dict[str, str], process_logs: Path, request: pytest.FixtureRequest
) -> Iterator[Proc]:
    """A worker that batches up to 4 images, started by the test once its jobs are queued."""
    env = {**base_env, "POSEGEN_MAX_BATCH": "4"}
    log = process_logs / f"{request.node.name}.log"
    port = free_port()
    proc = Proc(["worker", "--concurrency", "1", "--metrics-port", str(port)], env, log)
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"
    yield proc
    proc.stop()


def batches(worker: Proc) -> list[list[str]]:
    """The job ids of each pipeline call the worker logged."""
    lines = [json.loads(line) for line in worker.log.read_text().splitlines() if "{" in line[:1]]
    return [line["job_ids"] for line in lines if line.get("msg") == "batch started"]


def output(app: object, account: object, job: dict[str, object], index: int) -> np.ndarray:
    url = f"/v1/generations/{job['id']}/outputs/{index}"
    response = app.get(url, headers=account.headers)  # type: ignore[attr-defined]
    assert response.status_code == 200
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)


def test_several_outputs_charged_per_image_each_its_seeds_image(
    app, make_account, batch_worker, sessions
):
    account = make_account(credits=10)
    for wrong in (0, 5, "two"):
        refused = submit(app, account, num_outputs=wrong)
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "invalid_request"
    poor = make_account(credits=2)
    assert submit(app, poor, num_outputs=3).status_code == 402
    photo = astronaut_png()
    many = submit(app, account, image=photo, seed=50, num_outputs=3).json()
    assert many["credit_cost"] == 3 and many["params"]["num_outputs"] == 3
    blank = submit(app, account, pose_template_id=None, num_outputs=2).json()  # no person
    assert app.get("/v1/me", headers=account.headers).json()["credits"] == 5
    batch_worker.start()
    done = wait_for(app, account, many["id"], timeout=180)
    assert done["status"] == "completed", batch_worker.tail()
    assert [o["index"] for o in done["outputs"]] == [0, 1, 2]
    failed = wait_for(app, account, blank["id"], timeout=60)
    assert failed["error"]["code"] == "no_pose_detected", batch_worker.tail()
    assert ledger_kinds(sessions, many["id"]) == {"charge": 1}
    assert ledger_kinds(sessions, blank["id"]) == {"charge": 1, "refund": 1}
    assert app.get("/v1/me", headers=account.headers).json()["credits"] == 7  # 10 - 3
    # Output i is the image of the same job with seed + i, run as a job of its own.
    for i in (1, 2):
        alone = submit(app, account, image=photo, seed=50 + i).json()
        single = wait_for(app, account, alone["id"], timeout=120)
        assert single["status"] == "completed", batch_worker.tail()
        difference = np.abs(output(app, account, done, i) - output(app, account, single, 0))
        assert difference.max() <= 2, f"output {i}: {difference.max()}/255"
    assert not np.array_equal(output(app, account, done, 0), output(app, account, done, 1))


def test_jobs_of_one_call_end_each_on_their_own(
    app, make_account, batch_worker, sessions, settings
):
    users = [make_account(credits=5) for _ in range(5)]
    # Few steps: the call of four images stays inside its time allowance (60 s + 2 s a step
    # for 512x512 pixels: 63 s) on a busy 2-core CPU, where a step of it can take seconds.
    slow = {"num_inference_steps": 6, "strength": 1.0, "webhook_url": HOOK}
    ok_a = submit(app, users[0], image=astronaut_png(), seed=1, **slow).json()
    ok_b = submit(app, users[1], seed=2, prompt="another", **slow).json()
    no_pose = submit(app, users[2], pose_template_id=None, **slow).json()  # fails alone
    # Canceled once claimed with the others, before their call ends: no webhook, so that its
    # cancel passes the lock below.
    doomed = submit(app, users[3], seed=4, **{**slow, "webhook_url": None}).json()
    other = submit(app, users[4], **{**slow, "num_inference_steps": 7}).json()  # not with them
    with sessions() as held:
        # The worker records no_pose's failure (its webhook delivery) before the call: held
        # here until doomed's cancel is in and its heartbeat has seen it, the call cannot end
        # before.
        held.execute(text("LOCK TABLE webhook_deliveries IN SHARE MODE"))
        batch_worker.start()
        running = f"/v1/generations/{doomed['id']}"
        assert eventually(
            lambda: app.get(running, headers=users[3].headers).json()["status"] == "processing",
            timeout=120,
        ), batch_worker.tail()
        canceled = app.post(f"{running}/cancel", headers=users[3].headers).json()
        assert canceled["status"] == "canceled"
        time.sleep(3 * settings.heartbeat_seconds)
        held.rollback()
    ends = {
        name: wait_for(app, user, job["id"], timeout=240)
        for name, user, job in (
            ("a", users[0], ok_a), ("b", users[1], ok_b), ("no_pose", users[2], no_pose),
            ("doomed", users[3], doomed), ("other", users[4], other),
        )
    }  # fmt: skip
    assert {name: job["status"] for name, job in ends.items()} == {
        "a": "completed", "b": "completed", "no_pose": "failed", "doomed": "canceled",
        "other": "completed",
    }, batch_worker.tail()  # fmt: skip
    # One call ran the four compatible jobs; the fifth (another step count) ran on its own.
    assert batches(batch_worker) == [
        [ok_a["id"], ok_b["id"], no_pose["id"], doomed["id"]],
        [other["id"]],
    ]
    assert ends["no_pose"]["error"]["code"] == "no_pose_detected"
    assert ends["doomed"]["outputs"] == [] and len(ends["a"]["outputs"]) == 1
    assert ends["a"]["progress"] == {"step": 6, "total": 6}
    assert ends["other"]["started_at"] > ends["a"]["finished_at"]
    for name, kinds in (("a", {"charge": 1}), ("b", {"charge": 1}),
                        ("no_pose", {"charge": 1, "refund": 1}),
                        ("doomed", {"charge": 1, "refund": 1})):  # fmt: skip
        assert ledger_kinds(sessions, ends[name]["id"]) == kinds, name
    balances = [app.get("/v1/me", headers=u.headers).json()["credits"] for u in users]
    assert balances == [4, 4, 5, 5, 4]
    storage = Path(settings.storage_url.removeprefix("file://"))
    assert not (storage / "outputs" / doomed["id"]).exists()
    # Dropped at the call's end, never written (then deleted, as a cancel while finishing is).
    logged = [json.loads(line) for line in batch_worker.log.read_text().splitlines() if line[:1] == "{"]  # fmt: skip
    ends_of_doomed = [line["msg"] for line in logged if line.get("job_id") == doomed["id"]]
    assert "job canceled while running" in ends_of_doomed, batch_worker.tail()
    assert "job canceled while finishing" not in ends_of_doomed
    with sessions() as s:
        hooks = s.execute(select(WebhookDelivery.generation_id, WebhookDelivery.event_type)).all()
    # The calls' sizes, for the operator: one of four images and one of one.
    metrics = httpx.get(batch_worker.metrics_url).text
    assert f'posegen_batch_images_count{{model="{TINY}"}} 2.0' in metrics
    assert f'posegen_batch_images_sum{{model="{TINY}"}} 5.0' in metrics
    assert sorted((ends_by_id(ends)[g], e) for g, e in hooks) == [
        ("a", "generation.completed"), ("b", "generation.completed"),
        ("no_pose", "generation.failed"),
        ("other", "generation.completed"),
    ]  # fmt: skip


def ends_by_id(ends: dict[str, dict[str, object]]) -> dict[str, str]:
    return {str(job["id"]): name for name, job in ends.items()}
