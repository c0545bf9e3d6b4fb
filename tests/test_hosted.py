"""Hosted models end to end: the API, a real remote worker process (`posegen worker --queues
remote`) and a loopback HTTP server speaking the Inference API protocol (posegen.loopback).
What the provider received (token, prompt, control image) and what the user sees (the job,
its phase and ETA, its error, the balance and the ledger)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import redis
from PIL import Image
from sqlalchemy import select

from db.models import Generation, User, WebhookDelivery
from posegen.events import stream_key
from posegen.loopback import Answer, LoopbackProvider
from tests.factories import astronaut_png, eventually, ledger_kinds, submit, wait_for
from tests.processes import Proc
from tests.services import ROOT, free_port

TOKEN = "hf_loopback_secret_1234567890"
MODEL = "sd15-openpose-hf"  # 512x512, 3 credits, free tier
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def provider() -> Iterator[LoopbackProvider]:
    server = LoopbackProvider(token=TOKEN).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def remote_worker(
    base_env: dict[str, str], db_engine: object, process_logs: Path, provider: LoopbackProvider
) -> Iterator[Proc]:
    env = {
        **base_env,
        "POSEGEN_HF_API_URL": provider.url,
        "POSEGEN_HF_API_TOKEN": TOKEN,
        "POSEGEN_REMOTE_CONCURRENCY": "4",
        # Every job's time limit (its own allowance is a minute and more): the slow answer
        # runs past it in seconds.
        "POSEGEN_JOB_SOFT_TIME_LIMIT": "6",
        "POSEGEN_JOB_HARD_TIME_LIMIT": "12",
        "POSEGEN_LOG_LEVEL": "DEBUG",
    }
    port = free_port()
    args = ["worker", "--queues", "remote", "--metrics-port", str(port)]
    proc = Proc(args, env, process_logs / "remote.log").start()
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"
    yield proc
    proc.stop()
    assert TOKEN not in proc.tail(100000), "the token is in the remote worker's log"


@pytest.fixture(autouse=True)
def fresh(provider: LoopbackProvider) -> Iterator[None]:
    provider.script.clear()
    provider.received.clear()
    provider.token = TOKEN
    provider.peak_in_flight = 0
    yield


def _balance(sessions: object, user_id: str) -> int:
    with sessions() as s:  # type: ignore[operator]
        return int(s.scalar(select(User.credits).where(User.id == user_id)))


def _control(received: object) -> Image.Image:
    data = base64.b64decode(received.body["inputs"]["image"])  # type: ignore[attr-defined]
    return Image.open(io.BytesIO(data))


def _submit(app: object, account: object, **fields: object) -> dict[str, object]:
    response = submit(app, account, model_key=MODEL, **fields)  # type: ignore[arg-type]
    assert response.status_code == 202, response.text
    job: dict[str, object] = response.json()
    return job


def test_a_cold_model_is_waited_for_honestly_then_its_image_is_the_output(
    app, make_account, sessions, remote_worker, provider, broker_url
):
    provider.script.extend([Answer(503, {"error": "loading", "estimated_time": 2.0})])
    account = make_account(credits=10)
    job = _submit(
        app, account, prompt="an astronaut, hosted", pose_template_id="waving",
        webhook_url="http://127.0.0.1:9/hook",
    )  # fmt: skip
    # While the model loads: processing, in the provider_loading phase, with its estimate.
    seen: dict[str, object] = {}

    def loading() -> bool:
        seen.update(app.get(f"/v1/generations/{job['id']}", headers=account.headers).json())
        return seen["progress"].get("phase") == "provider_loading"  # type: ignore[union-attr]

    assert eventually(loading, timeout=30), seen
    assert seen["status"] == "processing" and 0 < seen["eta_seconds"] <= 2.0  # type: ignore[operator]
    done = wait_for(app, account, job["id"], timeout=30)
    assert done["status"] == "completed", done
    assert "phase" not in done["progress"] and done["routed_to"] is None  # type: ignore[operator]
    # What the provider received: twice the same request, with the token and the prompt, and
    # a control image of the job's size.
    assert len(provider.received) == 2
    assert provider.received[1].at - provider.received[0].at >= 1.9
    for got in provider.received:
        assert got.path == "/models/lllyasviel/control_v11p_sd15_openpose"
        assert got.authorization == f"Bearer {TOKEN}"
        inputs = got.body["inputs"]
        assert inputs["prompt"] == "an astronaut, hosted" and inputs["num_inference_steps"] == 30
        assert _control(got).size == (512, 512)
    # What the user sees: the output (the provider's image), the skeleton, the charge.
    output = app.get(f"/v1/generations/{job['id']}/outputs/0", headers=account.headers)
    assert Image.open(io.BytesIO(output.content)).size == (512, 512)
    pose = app.get(f"/v1/generations/{job['id']}/pose", headers=account.headers)
    assert pose.status_code == 200 and pose.content == base64.b64decode(
        provider.received[0].body["inputs"]["image"]
    )
    assert _balance(sessions, account.user_id) == 7
    assert ledger_kinds(sessions, job["id"]) == {"charge": 1}
    with sessions() as s:
        hooks = s.scalars(select(WebhookDelivery.event_type).where(WebhookDelivery.generation_id == job["id"])).all()  # fmt: skip
    assert "generation.completed" in hooks
    # The stream told of the wait, with the estimate.
    events = redis.Redis.from_url(broker_url).xrange(stream_key(str(job["id"])))
    phases = [
        json.loads(fields[b"data"]) for _, fields in events if fields[b"event"] == b"progress"
    ]
    assert any(
        p["progress"].get("phase") == "provider_loading" and p["eta_seconds"] for p in phases
    )


def test_the_retried_request_after_the_wait_shows_no_loading_phase(
    app, make_account, remote_worker, provider, broker_url
):
    provider.script.extend([Answer(503, {"estimated_time": 1.0}), Answer(delay=4)])
    account = make_account()
    job = _submit(app, account)
    url = f"/v1/generations/{job['id']}"
    assert eventually(lambda: len(provider.received) == 2 and provider.in_flight == 1, 30)
    got = app.get(url, headers=account.headers).json()
    assert got["status"] == "processing" and "phase" not in got["progress"], got
    assert got["eta_seconds"] is None, got
    events = redis.Redis.from_url(broker_url).xrange(stream_key(str(job["id"])))
    progress = [json.loads(f[b"data"]) for _, f in events if f[b"event"] == b"progress"]
    phases = [p["progress"].get("phase") for p in progress]
    assert phases[-2:] == ["provider_loading", None], phases
    assert wait_for(app, account, job["id"], timeout=30)["status"] == "completed"


def _heartbeat_stopped(worker: Proc, job_id: str) -> bool:
    for line in worker.tail(1_000_000).splitlines():
        if "heartbeat stopped" in line and job_id in line:
            return True
    return False


def test_every_way_a_hosted_job_ends_stops_its_heartbeat(
    app, make_account, remote_worker, provider
):
    provider.script.extend(
        [
            Answer(500, {"error": "broken"}),
            Answer(503, {"estimated_time": 60}),  # past the time limit: timeout
            Answer(503, {"estimated_time": 4.5}),
        ]
    )
    account = make_account(credits=10)
    failed = _submit(app, account)  # one at a time: each takes the next scripted answer
    assert wait_for(app, account, failed["id"], timeout=30)["error"]["code"] == "provider_error"  # type: ignore[index]
    late = _submit(app, account)
    assert wait_for(app, account, late["id"], timeout=30)["error"]["code"] == "timeout"  # type: ignore[index]
    canceled = _submit(app, account)
    url = f"/v1/generations/{canceled['id']}"

    def loading() -> bool:
        got = app.get(url, headers=account.headers).json()
        return got["progress"].get("phase") == "provider_loading"

    assert eventually(loading, timeout=30)
    assert app.post(f"{url}/cancel", headers=account.headers).json()["status"] == "canceled"
    for job in (failed, late, canceled):
        assert eventually(partial(_heartbeat_stopped, remote_worker, str(job["id"])), 10), job


def test_a_job_canceled_while_its_model_loads_stops_waiting_refunded(
    app, make_account, sessions, remote_worker, provider
):
    provider.script.append(Answer(503, {"error": "loading", "estimated_time": 4.5}))
    account = make_account(credits=10)
    job = _submit(app, account)
    url = f"/v1/generations/{job['id']}"

    def loading() -> bool:
        got = app.get(url, headers=account.headers).json()
        return got["progress"].get("phase") == "provider_loading"

    assert eventually(loading, timeout=30)
    assert app.post(f"{url}/cancel", headers=account.headers).json()["status"] == "canceled"
    assert eventually(lambda: "hosted job canceled while waiting" in remote_worker.tail(), 5)
    assert len(provider.received) == 1  # not asked again
    assert _balance(sessions, account.user_id) == 10
    assert ledger_kinds(sessions, job["id"]) == {"charge": 1, "refund": 1}


def test_the_pose_of_the_photo_is_extracted_on_the_cpu_and_sent(
    app, make_account, remote_worker, provider
):
    account = make_account()
    job = _submit(app, account, image=astronaut_png(), pose_template_id=None)
    done = wait_for(app, account, job["id"], timeout=60)
    assert done["status"] == "completed", done
    control = _control(provider.received[0]).convert("L")
    assert control.size == (512, 512) and control.getextrema()[1] > 0  # a skeleton was drawn


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (Answer(500, {"error": "CUDA error: device-side assert triggered"}), "500: CUDA error"),
        (Answer(400, {"error": "inputs.image is too large"}), "400: inputs.image"),
    ],
)
def test_a_provider_error_fails_the_job_with_its_message_refunded(
    app, make_account, sessions, remote_worker, provider, answer, says
):
    provider.script.append(answer)
    account = make_account(credits=10)
    job = _submit(app, account)
    done = wait_for(app, account, job["id"], timeout=30)
    assert done["status"] == "failed" and done["error"]["code"] == "provider_error"  # type: ignore[index]
    assert says in done["error"]["message"]  # type: ignore[index]
    assert _balance(sessions, account.user_id) == 10
    assert ledger_kinds(sessions, job["id"]) == {"charge": 1, "refund": 1}
    assert len(provider.received) == 1


def test_a_wrong_token_is_a_provider_error_that_shows_no_token(
    app, make_account, sessions, remote_worker, provider
):
    provider.token = "hf_the_right_one"  # the worker's token is now wrong: 401
    account = make_account(credits=10)
    job = _submit(app, account)
    done = wait_for(app, account, job["id"], timeout=30)
    assert done["error"]["code"] == "provider_error", done  # type: ignore[index]
    assert "401" in done["error"]["message"]  # type: ignore[index]
    assert TOKEN not in json.dumps(done) and "hf_" not in json.dumps(done)
    with sessions() as s:
        row = s.get(Generation, job["id"])
        assert TOKEN not in json.dumps([row.error_message, row.params, row.prompt])
    assert _balance(sessions, account.user_id) == 10
    assert ledger_kinds(sessions, job["id"]) == {"charge": 1, "refund": 1}


def test_a_rate_limit_is_waited_out_by_its_retry_after(app, make_account, remote_worker, provider):
    provider.script.append(Answer(429, {"error": "rate limited"}, retry_after="2"))
    account = make_account()
    job = _submit(app, account)
    done = wait_for(app, account, job["id"], timeout=30)
    assert done["status"] == "completed", done
    assert len(provider.received) == 2
    assert provider.received[1].at - provider.received[0].at >= 1.9


def test_a_slow_answer_past_the_time_limit_fails_the_job_refunded(
    app, make_account, sessions, remote_worker, provider
):
    provider.script.append(Answer(delay=20))
    account = make_account(credits=10)
    job = _submit(app, account)
    started = time.monotonic()
    done = wait_for(app, account, job["id"], timeout=30)
    assert done["status"] == "failed" and done["error"]["code"] == "timeout", done  # type: ignore[index]
    assert time.monotonic() - started < 15  # not held until the provider answered
    assert _balance(sessions, account.user_id) == 10
    assert ledger_kinds(sessions, job["id"]) == {"charge": 1, "refund": 1}


def test_a_model_loading_past_the_time_limit_is_not_waited_for(
    app, make_account, sessions, remote_worker, provider
):
    provider.script.append(Answer(503, {"error": "loading", "estimated_time": 60}))
    account = make_account(credits=10)
    job = _submit(app, account)
    done = wait_for(app, account, job["id"], timeout=30)
    assert done["error"]["code"] == "timeout", done  # type: ignore[index]
    assert len(provider.received) == 1  # no second try that could not finish in time
    assert ledger_kinds(sessions, job["id"]) == {"charge": 1, "refund": 1}


def test_one_remote_worker_runs_many_jobs_at_once(app, make_account, remote_worker, provider):
    provider.script.extend([Answer(delay=2)] * 4)
    account = make_account()
    jobs = [_submit(app, account) for _ in range(4)]
    started = time.monotonic()
    done = [wait_for(app, account, job["id"], timeout=30) for job in jobs]
    assert [job["status"] for job in done] == ["completed"] * 4
    # The peak shows them in flight together; the time only bounds a hang (in turn: 8 s).
    assert provider.peak_in_flight >= 3 and time.monotonic() - started < 15


def test_the_remote_worker_imports_no_torch():
    code = (
        "import sys; import posegen.cli.main, worker.celery_app, worker.tasks, worker.remote;"
        "from worker.remote import Remote; import posegen.hosted;"
        "from worker.engine.pose.mediapipe import MediaPipeExtractor; MediaPipeExtractor();"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_ready_shows_the_remote_worker_serving_the_hosted_models(app, remote_worker):
    def served() -> bool:
        models = app.get("/ready").json()["models"]
        return bool(models[MODEL]["workers"]) and models["sdxl-openpose-hf"]["workers"]

    assert eventually(served, timeout=30)
    models = app.get("/ready").json()["models"]
    assert models[MODEL]["workers"][0].startswith("remote-")
    assert models["tiny-sd15-openpose"]["workers"] == []  # no GPU worker in this module
