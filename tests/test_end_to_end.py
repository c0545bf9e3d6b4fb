"""Upload -> Postgres -> Redis -> a real Celery worker process -> a PNG, and the demo."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from posegen import credits
from tests.factories import astronaut_png, eventually, strand, submit, wait_for
from tests.services import ROOT

pytestmark = pytest.mark.slow


def test_submit_to_completed_png(app, make_account, gpu_worker, session):
    account = make_account(credits=2)
    job = submit(
        app,
        account,
        image=astronaut_png(),
        pose_template_id="waving",
        seed=1234,
        num_inference_steps=4,
    ).json()
    done = wait_for(app, account, job["id"], timeout=120)
    assert done["status"] == "completed", (done, gpu_worker.tail())
    assert done["progress"] == {"step": 3, "total": 3}  # 4 steps at strength 0.75
    assert done["outputs"] == [
        {
            "index": 0,
            "url": f"/v1/generations/{job['id']}/outputs/0",
            "width": 128,
            "height": 128,
            "content_type": "image/png",
        }
    ]
    assert done["started_at"] and done["finished_at"] and done["queue_position"] is None
    assert done["attempts"] == 1 and done["error"] is None
    output = app.get(done["outputs"][0]["url"], headers=account.headers)
    assert output.status_code == 200 and output.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(output.content))
    assert image.format == "PNG" and image.size == (128, 128)
    assert app.get("/v1/me", headers=account.headers).json()["credits"] == 1
    assert credits.ledger_sum(session, user_id=account.user_id) == 1


def test_same_seed_same_pixels_through_the_queue(app, make_account, gpu_worker):
    account = make_account()
    outputs = []
    for _ in range(2):
        job = submit(app, account, seed=99, pose_template_id="t-pose").json()
        done = wait_for(app, account, job["id"])
        assert done["status"] == "completed", gpu_worker.tail()
        outputs.append(app.get(done["outputs"][0]["url"], headers=account.headers).content)
    assert outputs[0] == outputs[1]


def test_blank_photo_fails_with_no_pose_and_is_refunded(app, make_account, gpu_worker):
    account = make_account(credits=1)
    job = submit(app, account, pose_template_id=None).json()  # a flat brown image: nobody in it
    done = wait_for(app, account, job["id"])
    assert done["status"] == "failed", gpu_worker.tail()
    assert done["error"]["code"] == "no_pose_detected"
    assert app.get("/v1/me", headers=account.headers).json()["credits"] == 1


def test_pose_extracted_from_the_photo(app, make_account, gpu_worker):
    account = make_account()
    job = submit(app, account, image=astronaut_png(), pose_template_id=None).json()
    done = wait_for(app, account, job["id"])
    assert done["status"] == "completed", (done, gpu_worker.tail())
    assert done["pose_source"] == "image"


def test_sdxl_tiny_model_through_the_queue(app, make_account, gpu_worker):
    account = make_account()
    job = submit(
        app, account, model_key="tiny-sdxl-openpose", pose_template_id="hands-on-hips"
    ).json()
    done = wait_for(app, account, job["id"])
    assert done["status"] == "completed", (done, gpu_worker.tail())
    assert done["outputs"][0]["width"] == 128


def test_cancel_a_running_job(app, make_account, gpu_worker, sessions, settings):
    """The worker stops between steps: the job queued behind a canceled one starts within a
    couple of seconds of the cancel, not after the canceled job's remaining steps."""
    import datetime as dt
    import json

    from sqlalchemy import select

    from db.models import CreditLedger

    account, other = make_account(credits=1), make_account()
    job = submit(app, account, num_inference_steps=150, strength=1.0).json()
    follow = submit(app, other).json()  # one worker, one job at a time: this one waits
    poll = f"/v1/generations/{job['id']}"
    wait_for(app, account, job["id"], statuses=("processing",))
    while app.get(poll, headers=account.headers).json()["progress"]["step"] == 0:
        time.sleep(0.02)
    canceled = app.post(f"{poll}/cancel", headers=account.headers).json()
    assert canceled["status"] == "canceled"
    started = wait_for(
        app, other, follow["id"], statuses=("processing", "completed", "failed"), timeout=30
    )
    at = {
        name: dt.datetime.fromisoformat(when)
        for name, when in (
            ("run", canceled["started_at"]),
            ("cancel", canceled["finished_at"]),
            ("next", started["started_at"]),
        )
    }
    # A cancel is seen between steps: within a heartbeat and the step under way (the pace is
    # this run's own, so a loaded machine's slow steps count; the rest of 150 steps would not).
    pace = (at["cancel"] - at["run"]) / canceled["progress"]["step"]
    waited = at["next"] - at["cancel"]
    assert waited < dt.timedelta(seconds=2) + 2 * pace, (waited, pace, gpu_worker.tail())
    assert wait_for(app, other, follow["id"])["status"] == "completed", gpu_worker.tail()
    # Stopped between steps: a fast device may run all 150 within the bound above, and a run
    # that ignored the cancel logs "job canceled while finishing" at its end instead.
    logged = [json.loads(line) for line in gpu_worker.log.read_text().splitlines() if line.startswith("{")]  # fmt: skip
    assert any(
        entry["msg"] == "job canceled while running" and entry.get("job_id") == job["id"]
        for entry in logged
    ), gpu_worker.tail()
    final = app.get(poll, headers=account.headers).json()
    assert final["status"] == "canceled" and final["outputs"] == []
    assert app.get("/v1/me", headers=account.headers).json()["credits"] == 1
    with sessions() as s:
        ledger = s.execute(
            select(CreditLedger.kind, CreditLedger.amount).where(
                CreditLedger.generation_id == job["id"]
            )
        ).all()
    assert sorted(map(tuple, ledger)) == [("charge", -1), ("refund", 1)]
    storage = Path(settings.storage_url.removeprefix("file://"))
    assert list((storage / "outputs").glob(f"{job['id']}/*")) == []


def run_demo(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`posegen demo` run in `folder` with none of this run's POSEGEN_ settings; it passed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSEGEN_")}
    result = subprocess.run(
        [sys.executable, "-m", "posegen.cli.main", "demo", *args],
        cwd=folder,
        env={
            **env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_demo_runs_end_to_end(tmp_path):
    """`posegen demo` in an empty folder: SQLite, filesystem broker, tiny models, local disk."""
    result = run_demo(tmp_path)
    match = re.search(r"^output: (.+\.png)$", result.stdout, re.M)
    assert match, result.stdout
    image = Image.open(match.group(1))
    assert image.size == (128, 128)
    assert (tmp_path / "var" / "posegen.db").exists()
    # Everything it writes is under ./var (the embedded broker's control folder included).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["var"]


def test_demo_hosted_runs_with_no_gpu_against_a_loopback_provider(tmp_path):
    """`posegen demo --hosted`: the remote worker, a cold loopback provider, no weights."""
    result = run_demo(tmp_path, "--hosted")
    assert "to sd15-openpose-hf" in result.stdout and "provider_loading" in result.stderr
    match = re.search(r"^output: (.+\.png)$", result.stdout, re.M)
    assert match, result.stdout
    assert Image.open(match.group(1)).size == (512, 512)
    assert not (tmp_path / "var" / "models").exists()  # no tiny models built: no weights at all
    logs = "".join(p.read_text() for p in (tmp_path / "var" / "logs").iterdir())
    assert "hosted job completed" in logs and "hf_demo_" not in logs


def test_demo_says_why_the_api_exited(tmp_path):
    """An API process that dies at start: the demo's error carries the end of its log."""
    from posegen.cli.demo import _wait_healthy

    log = tmp_path / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; print('ModuleNotFoundError: no x'); sys.exit(3)"],
            stdout=out,
        )
        proc.wait()
    with pytest.raises(RuntimeError) as err:
        _wait_healthy("http://127.0.0.1:9", proc, log, timeout=10)
    assert "exited (3)" in str(err.value)
    assert "ModuleNotFoundError: no x" in str(err.value)


def test_metrics_from_api_and_worker(app, make_account, gpu_worker):
    import httpx

    account = make_account()
    job = submit(app, account).json()
    assert wait_for(app, account, job["id"])["status"] == "completed"
    worker = httpx.get(gpu_worker.metrics_url).text
    assert 'posegen_jobs_finished_total{model="tiny-sd15-openpose",status="completed"}' in worker
    assert 'posegen_job_queue_wait_seconds_count{model="tiny-sd15-openpose"}' in worker
    assert 'posegen_job_run_seconds_bucket{le="1.0",model="tiny-sd15-openpose"}' in worker
    canceled = submit(app, account, num_inference_steps=150, strength=1.0).json()
    app.post(f"/v1/generations/{canceled['id']}/cancel", headers=account.headers)
    api = app.get("/metrics").text
    assert 'posegen_jobs_finished_total{model="tiny-sd15-openpose",status="canceled"} 1.0' in api
    assert 'posegen_queue_depth{queue="generation"}' in api


def test_jobs_the_reconciler_fails_are_counted(app, make_account, sessions, settings, housekeeping):
    """A job whose worker died too often is failed by the reconciler on the housekeeping
    worker, and counted in that worker's metrics like any other failed job."""
    import time

    import httpx

    sample = 'posegen_jobs_finished_total{model="tiny-sd15-openpose",status="failed"} '

    def failed_count() -> float:
        deadline = time.monotonic() + 30  # the worker may still be starting
        while True:
            try:
                page = httpx.get(housekeeping.metrics_url).text
                break
            except httpx.ConnectError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        for line in page.splitlines():
            if line.startswith(sample):
                return float(line.removeprefix(sample))
        return 0.0

    before = failed_count()
    account = make_account()
    job = submit(app, account).json()
    with sessions() as s:  # claimed max_attempts times, the last worker gone
        strand(s, job["id"], attempts=settings.max_attempts, lease_expired_s=5)
        s.commit()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and failed_count() < before + 1:
        time.sleep(0.3)
    assert failed_count() == before + 1
    final = app.get(f"/v1/generations/{job['id']}", headers=account.headers).json()
    assert final["status"] == "failed" and final["error"]["code"] == "internal_error"


def test_a_worker_and_beat_with_json_logs_write_json_lines_only(housekeeping, process_logs):
    """With POSEGEN_LOG_JSON, no plain-text banner or warning between the JSON lines (a log
    pipeline parses every line); the worker's banner's facts are one line of their own."""
    import json
    import time

    beat_log = process_logs / "beat.log"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
        " ready." in housekeeping.tail(200) and "Starting" in beat_log.read_text()
    ):
        time.sleep(0.2)
    entries: dict[str, list[dict[str, object]]] = {}
    for log, process in ((housekeeping.log, "worker"), (beat_log, "beat")):
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        entries[process] = [json.loads(line) for line in lines]  # raises on a plain-text line
        assert {e["process"] for e in entries[process]} == {process}
    started = [e for e in entries["worker"] if e["msg"] == "worker starting"]
    assert started and started[0]["queues"] == ["webhooks", "maintenance"]
    assert started[0]["concurrency"] == 2 and started[0]["broker"] == "redis"


def test_the_celery_parent_never_loads_torch(app, make_account, gpu_worker):
    """CUDA must not be initialised before fork: the parent process has no torch at all."""
    import subprocess as sp

    account = make_account()
    assert wait_for(app, account, submit(app, account).json()["id"])["status"] == "completed"
    parent = gpu_worker.proc.pid
    children = sp.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    assert children, "the prefork pool has a child"

    def loaded_torch(pid: int | str) -> bool:
        with open(f"/proc/{pid}/maps") as maps:
            return "libtorch" in maps.read()

    assert not loaded_torch(parent)
    assert any(loaded_torch(child) for child in children)


def test_a_job_past_its_soft_time_limit_fails_with_timeout(app, settings, make_account, gpu_worker):
    from fastapi.testclient import TestClient

    from api.app import create_app

    strict = settings.model_copy(update={"job_soft_time_limit": 0.5, "job_hard_time_limit": 60})
    account = make_account(credits=2)
    with TestClient(create_app(strict)) as client:
        job = submit(client, account, num_inference_steps=150, strength=1.0).json()
        done = wait_for(client, account, job["id"])
        assert done["status"] == "failed", gpu_worker.tail()
        assert done["error"]["code"] == "timeout"
        assert client.get("/v1/me", headers=account.headers).json()["credits"] == 2  # refunded
    # The worker survived and takes the next job (published with the normal limits).
    follow = submit(app, account).json()
    assert wait_for(app, account, follow["id"])["status"] == "completed", gpu_worker.tail()


def test_time_limits_grow_with_steps_and_pixels(settings):
    from db.models import Generation
    from posegen.queue import time_limits

    def job(steps: int, size: int) -> Generation:
        return Generation(params={"num_inference_steps": steps, "width": size, "height": size})

    tiny_soft, tiny_hard = time_limits(job(2, 128), settings)
    xl_soft, xl_hard = time_limits(job(40, 1024), settings)
    assert 60 <= tiny_soft < xl_soft <= settings.job_soft_time_limit
    assert tiny_hard > tiny_soft and xl_hard <= settings.job_hard_time_limit


def test_structured_logs_carry_the_job_id_across_api_and_worker(
    app, make_account, gpu_worker, caplog
):
    import json
    import logging

    caplog.set_level(logging.INFO, logger="api")
    account = make_account()
    job = submit(app, account).json()
    assert wait_for(app, account, job["id"])["status"] == "completed"
    assert any(
        getattr(r, "job_id", None) == job["id"] and r.getMessage() == "job submitted"
        for r in caplog.records
    )

    def logged() -> set[str]:
        lines = gpu_worker.log.read_text().splitlines()
        return {
            entry["msg"]
            for entry in (json.loads(line) for line in lines if line.startswith("{"))
            if entry.get("job_id") == job["id"]
        }

    # The worker logs the job's end just after it records it, which the poll may see first.
    eventually(lambda: {"job started", "job completed"} <= logged(), timeout=10)
    mine = logged()
    assert {"job started", "job completed"} <= mine
