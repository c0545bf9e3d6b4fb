"""Money under concurrency and failure, idempotency, priority, rate limits (real services)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from db.models import AiModel, CreditLedger, Generation
from posegen import credits, lifecycle
from posegen.jobs import queries
from tests.factories import png_bytes, strand, submit, wait_for
from tests.services import settings_from

IMAGE = png_bytes()


def _post(base: str, headers: dict[str, str], **data: str) -> httpx.Response:
    form = {"model_key": "tiny-sd15-openpose", "pose_template_id": "standing", **data}
    files = {"image": ("p.png", IMAGE, "image/png")}
    return httpx.post(f"{base}/v1/generations", headers=headers, data=form, files=files, timeout=60)  # fmt: skip


def test_thirty_concurrent_submits_with_ten_credits(live_api, make_account, session, base_env):
    account = make_account(credits=10)
    inputs = Path(base_env["POSEGEN_STORAGE_URL"].removeprefix("file://")) / "inputs"
    before = {p.name for p in inputs.iterdir()} if inputs.exists() else set()
    with ThreadPoolExecutor(max_workers=30) as pool:
        responses = list(pool.map(lambda _: _post(live_api, account.headers), range(30)))
    codes = sorted(r.status_code for r in responses)
    odd = [r.text for r in responses if r.status_code not in (202, 402)]
    assert codes.count(202) == 10 and codes.count(402) == 20, (codes, odd)
    me = httpx.get(f"{live_api}/v1/me", headers=account.headers).json()
    assert me["credits"] == 0
    assert credits.ledger_sum(session, user_id=account.user_id) == 0
    job_ids = set(session.scalars(select(Generation.id).where(Generation.user_id == account.user_id)))  # fmt: skip
    assert len(job_ids) == 10
    # The refused submits left no stored input behind (whether the quick balance check or the
    # charge itself refused them); an empty folder of a deleted input does not count.
    added = {p.name for p in inputs.iterdir() if any(p.iterdir())} - before
    assert added == job_ids


def test_ten_concurrent_replays_make_one_job_one_charge(live_api, make_account, session):
    account = make_account(credits=5)
    headers = {**account.headers, "Idempotency-Key": "order-42"}
    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(lambda _: _post(live_api, headers, seed="5"), range(10)))
    assert {r.status_code for r in responses} <= {200, 202}
    assert [r.status_code for r in responses].count(202) == 1
    assert len({r.json()["id"] for r in responses}) == 1
    assert httpx.get(f"{live_api}/v1/me", headers=account.headers).json()["credits"] == 4
    different = _post(live_api, headers, seed="6")
    assert different.status_code == 422
    assert different.json()["error"]["code"] == "idempotency_key_reused"


def test_failure_path_twice_refunds_once(app, make_account, sessions):
    account = make_account(credits=3)
    job = submit(app, account).json()
    for _ in range(2):
        with sessions() as s:
            lifecycle.fail(s, job_id=job["id"], code="no_pose_detected", message="nobody there")
            s.commit()
    assert app.get("/v1/me", headers=account.headers).json()["credits"] == 3
    with sessions() as s:
        refunds = s.scalar(select(func.count()).select_from(CreditLedger).where(CreditLedger.generation_id == job["id"], CreditLedger.kind == "refund"))  # fmt: skip
    assert refunds == 1
    failed = app.get(f"/v1/generations/{job['id']}", headers=account.headers).json()
    assert failed["error"] == {"code": "no_pose_detected", "message": "nobody there"}


def test_cancel_then_fail_refunds_once(app, make_account, sessions):
    account = make_account(credits=2)
    job = submit(app, account).json()
    app.post(f"/v1/generations/{job['id']}/cancel", headers=account.headers)
    with sessions() as s:
        assert lifecycle.fail(s, job_id=job["id"], code="internal_error", message="late") is None
        s.commit()
        assert credits.ledger_sum(s, user_id=account.user_id) == 2
    assert app.get("/v1/me", headers=account.headers).json()["credits"] == 2


def test_rate_limit_answers_429_with_retry_after(settings, db_engine, make_account):
    from fastapi.testclient import TestClient

    from api.app import create_app

    limited = settings.model_copy(update={"rate_limit_per_minute": {"free": 2}})
    account = make_account()
    with TestClient(create_app(limited)) as client:
        assert [submit(client, account).status_code for _ in range(2)] == [202, 202]
        response = submit(client, account)
    assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(response.headers["retry-after"]) <= 60


@pytest.mark.slow
def test_higher_priority_starts_first_with_one_worker(app, make_account, gpu_worker, sessions):
    # Two models the running worker serves, given priorities far apart for this test (a
    # worker consumes the queues of the models there were when it started).
    def prioritise(sd15: int, sdxl: int) -> None:
        with sessions() as s:
            for key, priority in (("tiny-sd15-openpose", sd15), ("tiny-sdxl-openpose", sdxl)):
                s.scalars(select(AiModel).where(AiModel.model_key == key)).one().priority = priority
            s.commit()

    prioritise(1, 9)
    try:
        account = make_account()
        blocker = submit(app, account, num_inference_steps=30, strength=1.0).json()  # SD1.5, 1
        wait_for(app, account, blocker["id"], statuses=("processing",))
        low = submit(app, account).json()
        high = submit(app, account, model_key="tiny-sdxl-openpose").json()  # 9
        assert app.get(f"/v1/generations/{high['id']}", headers=account.headers).json()["queue_position"] == 0  # fmt: skip
        done = {j: wait_for(app, account, j) for j in (blocker["id"], low["id"], high["id"])}
        assert all(d["status"] == "completed" for d in done.values()), gpu_worker.tail()
        assert done[high["id"]]["started_at"] < done[low["id"]]["started_at"]
    finally:
        prioritise(5, 5)


@pytest.mark.slow
def test_eta_from_recent_run_times(app, make_account, gpu_worker):
    account = make_account()
    first = submit(app, account).json()
    wait_for(app, account, first["id"])
    queries._RUN_SECONDS.clear()  # the API caches "no history yet" for RUN_SECONDS_TTL
    blocker = submit(app, account, num_inference_steps=40, strength=1.0).json()
    wait_for(app, account, blocker["id"], statuses=("processing",))
    queued = submit(app, account).json()
    assert queued["queue_position"] == 0 and queued["eta_seconds"] is not None
    assert queued["eta_seconds"] > 0
    wait_for(app, account, queued["id"])


def test_settings_parse_contract_formats():
    s = settings_from({"POSEGEN_WEBHOOK_RETRY_SCHEDULE": "5,30", "POSEGEN_RATE_LIMIT_PER_MINUTE": "free=1,pro=9"})  # fmt: skip
    assert s.webhook_retry_schedule == [5.0, 30.0] and s.rate_limit_per_minute == {"free": 1, "basic": 120, "pro": 9, "enterprise": 3000}  # fmt: skip


def test_expired_idempotency_keys_are_purged_and_reusable(app, make_account, sessions):
    import datetime as dt

    from sqlalchemy import update

    from db.models import IdempotencyKey
    from posegen.reconciler import purge_expired_idempotency_keys

    account = make_account()
    headers = {"Idempotency-Key": "k-1"}
    first = submit(app, account, headers=headers).json()
    with sessions() as s:
        s.execute(
            update(IdempotencyKey).values(
                expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            )
        )
        s.commit()
    # An expired key is a new request: a new job, charged again.
    second = submit(app, account, headers=headers)
    assert second.status_code == 202 and second.json()["id"] != first["id"]
    with sessions() as s:
        s.execute(
            update(IdempotencyKey).values(
                expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            )
        )
        assert purge_expired_idempotency_keys(s) == 1
        s.commit()


def test_reconciler_fails_a_job_past_its_attempts_with_a_refund(
    app, make_account, sessions, settings
):
    from posegen import reconciler

    account = make_account(credits=1)
    job = submit(app, account).json()
    with sessions() as s:  # a worker claimed it max_attempts times and died each time
        strand(s, job["id"], attempts=settings.max_attempts, lease_expired_s=5)
        s.commit()
        sweep = reconciler.reconcile(s, settings=settings)
        s.commit()
    assert sweep.failed == 1 and sweep.failed_models == ("tiny-sd15-openpose",)
    failed = app.get(f"/v1/generations/{job['id']}", headers=account.headers).json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "internal_error"
    assert app.get("/v1/me", headers=account.headers).json()["credits"] == 1


def test_reconciler_requeues_an_expired_lease_and_republishes_stale_queued(
    app, make_account, sessions, settings
):
    import datetime as dt

    from sqlalchemy import update

    from posegen import reconciler

    account = make_account()
    running = submit(app, account).json()
    waiting = submit(app, account).json()
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    with sessions() as s:
        strand(s, running["id"], attempts=1, lease_expired_s=3600)
        s.execute(
            update(Generation).where(Generation.id == waiting["id"]).values(published_at=long_ago)
        )
        s.commit()
        sweep = reconciler.reconcile(s, settings=settings)
        sent = [m.args[0] for m in s.info.get("outbox", [])]
        s.commit()
    assert (sweep.requeued, sweep.republished) == (1, 1)
    assert sorted(sent) == sorted([running["id"], waiting["id"]])
    again = app.get(f"/v1/generations/{running['id']}", headers=account.headers).json()
    assert again["status"] == "queued" and again["queue_position"] is not None
