"""What is kept of a job (posegen.retention), on Postgres, Redis, local storage and the real
worker: photos go once a job ends, outputs once it is deleted or its retention runs out."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import CreditLedger, Generation, User, WebhookDelivery
from db.plans import generic_plan
from db.types import utcnow
from posegen import credits, lifecycle, retention
from posegen.settings import Settings
from posegen.storage import Storage, storage_from_settings
from tests.factories import Account, astronaut_png, eventually, png_bytes, submit, wait_for
from tests.processes import start_api
from tests.services import settings_from

WORKER = "test-worker:1"


# The quiet broker: no worker listens there, so the jobs submitted through it stay queued (the
# module's `gpu_worker` listens on its other broker, `base_env`'s).
@pytest.fixture
def quiet_app(base_env: dict[str, str], quiet_broker_url: str, db_engine: object) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from api.app import create_app

    settings = settings_from({**base_env, "POSEGEN_BROKER_URL": quiet_broker_url})
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def storage(settings: Settings) -> Storage:
    return storage_from_settings(settings)


def stored(storage: Storage, key: str) -> bool:
    path = storage.local_path(key)
    assert path is not None
    return path.exists()


def row(sessions: sessionmaker[Session], job_id: str) -> Generation:
    with sessions() as session:
        job = session.get_one(Generation, job_id)
        session.expunge(job)
        return job


def ledger(sessions: sessionmaker[Session], job_id: str) -> list[tuple[str, int]]:
    with sessions() as session:
        rows = session.execute(
            select(CreditLedger.kind, CreditLedger.amount)
            .where(CreditLedger.generation_id == job_id)
            .order_by(CreditLedger.id)
        )
        return [(kind, amount) for kind, amount in rows]


def balance(sessions: sessionmaker[Session], account: Account) -> tuple[int, int]:
    """(the user's balance, the sum of their ledger): always equal."""
    with sessions() as session:
        user = session.get_one(User, account.user_id)
        return user.credits, credits.ledger_sum(session, user_id=account.user_id)


def finish(
    sessions: sessionmaker[Session], storage: Storage, job_id: str, *, ago: dt.timedelta
) -> str:
    """Complete a queued job as a worker does (claim, store the output, complete), finished
    `ago` before now, without removing its photos (as a worker that died right after the
    commit): the output's key."""
    key = f"outputs/{job_id}/0.png"
    with sessions.begin() as session:
        assert lifecycle.claim(session, job_id=job_id, worker_id=WORKER, lease_seconds=60)
    storage.put(key, png_bytes((128, 128)))
    with sessions.begin() as session:
        outputs = [{"index": 0, "key": key, "width": 128, "height": 128}]
        done = lifecycle.complete(
            session, job_id=job_id, worker_id=WORKER, outputs=outputs, steps=2
        )
        assert done is not None
        session.execute(
            update(Generation).where(Generation.id == job_id).values(finished_at=utcnow() - ago)
        )
    return key


def inputs(job_id: str) -> list[str]:
    return [f"inputs/{job_id}/image.png", f"inputs/{job_id}/pose.png"]


# -- with the real worker ------------------------------------------------------------------------


def test_a_finished_job_keeps_its_output_and_not_the_photos(
    app, make_account, gpu_worker, sessions, storage
):
    account = make_account(credits=5)
    photo = astronaut_png()
    job = submit(
        app,
        account,
        image=photo,
        pose_template_id=None,
        files={"pose_image": ("pose.png", photo, "image/png")},
    ).json()
    blank = submit(app, account, pose_template_id=None).json()  # nobody in it: it fails
    assert all(stored(storage, key) for key in inputs(job["id"]))
    done = wait_for(app, account, job["id"], timeout=120)
    assert done["status"] == "completed", (done, gpu_worker.tail())
    failed = wait_for(app, account, blank["id"], timeout=120)
    assert failed["error"]["code"] == "no_pose_detected", gpu_worker.tail()

    for job_id in (job["id"], blank["id"]):
        assert eventually(lambda: row(sessions, job_id).purged_at is not None), gpu_worker.tail()  # noqa: B023
        assert not any(stored(storage, key) for key in inputs(job_id))
        assert not stored(storage, f"inputs/{job_id}")  # nor its folder
        assert row(sessions, job_id).deleted_at is None
    # The output stays, and is served.
    kept = row(sessions, job["id"])
    assert [out["key"] for out in kept.outputs] == [f"outputs/{job['id']}/0.png"]
    assert stored(storage, kept.outputs[0]["key"])
    answer = app.get(f"/v1/generations/{job['id']}", headers=account.headers).json()
    assert len(answer["outputs"]) == 1 and answer["deleted_at"] is None
    assert app.get(answer["outputs"][0]["url"], headers=account.headers).status_code == 200
    assert ledger(sessions, blank["id"]) == [("charge", -1), ("refund", 1)]


def test_delete_removes_a_completed_jobs_files_and_keeps_it_listed(
    app, make_account, gpu_worker, sessions, storage
):
    account, stranger = make_account(credits=3), make_account()
    job = submit(app, account, image=astronaut_png()).json()
    done = wait_for(app, account, job["id"], timeout=120)
    assert done["status"] == "completed", (done, gpu_worker.tail())
    output = f"outputs/{job['id']}/0.png"
    assert stored(storage, output)

    # Another user's job is a missing one: nothing changes.
    refused = app.delete(f"/v1/generations/{job['id']}", headers=stranger.headers)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    assert stored(storage, output) and row(sessions, job["id"]).deleted_at is None

    response = app.delete(f"/v1/generations/{job['id']}", headers=account.headers)
    assert response.status_code == 204 and response.content == b""
    assert not stored(storage, output) and not stored(storage, f"outputs/{job['id']}")
    assert not any(stored(storage, key) for key in inputs(job["id"]))
    deleted = row(sessions, job["id"])
    assert deleted.status == "completed" and deleted.outputs == []
    assert deleted.deleted_at is not None and deleted.purged_at is not None

    answer = app.get(f"/v1/generations/{job['id']}", headers=account.headers).json()
    assert answer["status"] == "completed" and answer["outputs"] == []
    assert answer["deleted_at"] == deleted.deleted_at.isoformat().replace("+00:00", "Z")
    listed = app.get("/v1/generations", headers=account.headers).json()["items"]
    assert [(j["id"], j["outputs"], j["deleted_at"]) for j in listed] == [
        (job["id"], [], answer["deleted_at"])
    ]
    gone = app.get(done["outputs"][0]["url"], headers=account.headers)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    # A completed job deleted is not refunded: it ran.
    assert ledger(sessions, job["id"]) == [("charge", -1)]
    assert balance(sessions, account) == (2, 2)

    again = app.delete(f"/v1/generations/{job['id']}", headers=account.headers)
    assert again.status_code == 204
    assert row(sessions, job["id"]).deleted_at == deleted.deleted_at


# -- jobs that still run -------------------------------------------------------------------------


def test_delete_cancels_a_queued_job_first_refunded_once(
    quiet_app, make_account, sessions, storage
):
    account = make_account(credits=3)
    job = submit(quiet_app, account, webhook_url="http://127.0.0.1:9/hook").json()
    assert stored(storage, inputs(job["id"])[0])

    assert (
        quiet_app.delete(f"/v1/generations/{job['id']}", headers=account.headers).status_code == 204
    )
    deleted = row(sessions, job["id"])
    assert deleted.status == "canceled" and deleted.deleted_at and deleted.purged_at
    assert not stored(storage, inputs(job["id"])[0])
    assert ledger(sessions, job["id"]) == [("charge", -1), ("refund", 1)]
    assert balance(sessions, account) == (3, 3)
    with sessions() as session:
        events = session.scalars(
            select(WebhookDelivery.event_type).where(WebhookDelivery.generation_id == job["id"])
        ).all()
    assert events == ["generation.canceled"]
    answer = quiet_app.get(f"/v1/generations/{job['id']}", headers=account.headers).json()
    assert answer["status"] == "canceled" and answer["deleted_at"] and answer["outputs"] == []


def test_delete_cancels_a_running_job_and_its_worker_lets_go(
    quiet_app, make_account, sessions, storage
):
    account = make_account(credits=3)
    job = submit(quiet_app, account).json()
    with sessions.begin() as session:
        assert lifecycle.claim(session, job_id=job["id"], worker_id=WORKER, lease_seconds=60)

    assert (
        quiet_app.delete(f"/v1/generations/{job['id']}", headers=account.headers).status_code == 204
    )
    assert row(sessions, job["id"]).status == "canceled"
    assert not stored(storage, inputs(job["id"])[0])
    assert ledger(sessions, job["id"]) == [("charge", -1), ("refund", 1)]
    assert balance(sessions, account) == (3, 3)
    with sessions.begin() as session:  # the worker's next heartbeat: no longer its job
        assert not lifecycle.heartbeat(
            session, job_id=job["id"], worker_id=WORKER, lease_seconds=60
        )
        outputs = [{"index": 0, "key": "outputs/x/0.png", "width": 128, "height": 128}]
        assert (
            lifecycle.complete(
                session, job_id=job["id"], worker_id=WORKER, outputs=outputs, steps=2
            )
            is None
        )


@pytest.fixture
def quiet_api(base_env, quiet_broker_url, db_engine, process_logs) -> Iterator[str]:
    env = {**base_env, "POSEGEN_BROKER_URL": quiet_broker_url}
    proc, base = start_api(env, process_logs / "retention-api.log")
    yield base
    proc.stop()


def test_racing_deletes_and_cancels_refund_once(quiet_api, make_account, sessions):
    account = make_account(credits=3)
    with httpx.Client(base_url=quiet_api, headers=account.headers) as client:
        job_id = submit(client, account).json()["id"]
    start = threading.Barrier(6)
    answers: list[tuple[str, int]] = []

    def send(method: str, path: str) -> None:
        with httpx.Client(base_url=quiet_api, headers=account.headers, timeout=30) as client:
            start.wait()
            answers.append((method, client.request(method, path).status_code))

    calls = [("DELETE", f"/v1/generations/{job_id}")] * 4 + [
        ("POST", f"/v1/generations/{job_id}/cancel")
    ] * 2
    threads = [threading.Thread(target=send, args=call) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(code for method, code in answers if method == "DELETE") == [204] * 4
    assert all(code in (200, 409) for method, code in answers if method == "POST")
    assert row(sessions, job_id).status == "canceled" and row(sessions, job_id).deleted_at
    assert ledger(sessions, job_id) == [("charge", -1), ("refund", 1)]
    assert balance(sessions, account) == (3, 3)


# -- beat's sweep --------------------------------------------------------------------------------


def test_the_sweep_removes_what_finished_jobs_left_and_never_a_running_jobs_photos(
    quiet_app, make_account, sessions, storage, settings
):
    account = make_account(credits=10)
    ids = {
        name: submit(quiet_app, account).json()["id"]
        for name in ("queued", "processing", "completed", "canceled")
    }
    with sessions.begin() as session:
        assert lifecycle.claim(
            session, job_id=ids["processing"], worker_id=WORKER, lease_seconds=60
        )
    finish(sessions, storage, ids["completed"], ago=dt.timedelta(0))
    canceled = quiet_app.post(f"/v1/generations/{ids['canceled']}/cancel", headers=account.headers)
    assert canceled.status_code == 200
    assert all(stored(storage, inputs(job_id)[0]) for job_id in ids.values())

    retention.sweep(sessions, storage=storage, settings=settings)
    for name in ("completed", "canceled"):
        assert not stored(storage, inputs(ids[name])[0])
        assert row(sessions, ids[name]).purged_at is not None
    # An interrupted job runs again from its photos: they stay while it may.
    for name in ("queued", "processing"):
        assert stored(storage, inputs(ids[name])[0])
        assert row(sessions, ids[name]).purged_at is None
    assert stored(storage, f"outputs/{ids['completed']}/0.png")
    assert row(sessions, ids["completed"]).deleted_at is None


def test_beat_sweeps_the_photos_of_a_job_canceled_without_them(
    quiet_app, make_account, housekeeping, sessions, storage
):
    # A cancel leaves the photos to beat's storage sweep (every POSEGEN_RECONCILE_INTERVAL).
    account = make_account()
    job_id = submit(quiet_app, account).json()["id"]
    canceled = quiet_app.post(f"/v1/generations/{job_id}/cancel", headers=account.headers)
    assert canceled.status_code == 200 and stored(storage, inputs(job_id)[0])
    assert eventually(lambda: row(sessions, job_id).purged_at is not None), housekeeping.tail()
    assert not stored(storage, inputs(job_id)[0])
    assert row(sessions, job_id).deleted_at is None


def test_retention_deletes_only_the_outputs_older_than_its_days(
    quiet_app, make_account, sessions, storage, settings
):
    account = make_account(credits=10)
    old, recent = (submit(quiet_app, account).json()["id"] for _ in range(2))
    old_key = finish(sessions, storage, old, ago=dt.timedelta(days=8))
    recent_key = finish(sessions, storage, recent, ago=dt.timedelta(days=6))
    failed = submit(quiet_app, account).json()["id"]
    with sessions.begin() as session:
        lifecycle.fail(session, job_id=failed, code="internal_error", message="x")
        session.execute(
            update(Generation)
            .where(Generation.id == failed)
            .values(finished_at=utcnow() - dt.timedelta(days=30))
        )

    kept_forever = retention.sweep(sessions, storage=storage, settings=settings)
    assert kept_forever.expired == 0 and stored(storage, old_key)

    week = settings.model_copy(update={"output_retention_days": 7})
    swept = retention.sweep(sessions, storage=storage, settings=week)
    assert swept.expired == 1
    expired = row(sessions, old)
    assert expired.deleted_at and expired.purged_at and expired.outputs == []
    assert not stored(storage, old_key)
    answer = quiet_app.get(f"/v1/generations/{old}", headers=account.headers).json()
    assert answer["status"] == "completed" and answer["outputs"] == [] and answer["deleted_at"]
    assert (
        quiet_app.get(f"/v1/generations/{old}/outputs/0", headers=account.headers).status_code
        == 404
    )

    assert stored(storage, recent_key) and row(sessions, recent).deleted_at is None
    assert len(row(sessions, recent).outputs) == 1
    assert row(sessions, failed).deleted_at is None  # it had no outputs to expire
    assert retention.sweep(sessions, storage=storage, settings=week).expired == 0


# -- the sweep's queries -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "index"),
    [
        (retention.unpurged(200), "ix_generations_unpurged"),
        (retention.expired_outputs(utcnow(), 200), "ix_generations_kept_outputs"),
    ],
    ids=["unpurged", "expired outputs"],
)
def test_the_sweeps_queries_read_their_partial_index(conn, statement, index):
    plan = "\n".join(generic_plan(conn, statement, {}))
    assert index in plan and "Seq Scan" not in plan, plan


def test_an_empty_retention_setting_means_outputs_are_kept():
    assert Settings(output_retention_days="").output_retention_days is None  # type: ignore[arg-type]
    assert Settings(output_retention_days="30").output_retention_days == 30  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Settings(output_retention_days=0)
