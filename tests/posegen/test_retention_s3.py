"""A job's files leave S3 (moto_server, a real HTTP S3 endpoint) when it ends and when it is
deleted, and a delete that storage could not finish is finished by the sweep."""

from __future__ import annotations

import datetime as dt
from typing import Any

import boto3
import pytest
from sqlalchemy.orm import Session, sessionmaker

from db.models import Generation
from posegen import retention
from posegen.settings import Settings
from posegen.storage import Storage, storage_from_settings
from tests.factories import astronaut_png, submit
from tests.posegen import test_s3_storage
from tests.posegen.test_retention import finish, ledger, row
from tests.services import settings_from

pytestmark = pytest.mark.slow
BUCKET = "posegen-retention"
moto = test_s3_storage.moto
aws_env = test_s3_storage.aws_env


# The module's own database (`base_env`), which no housekeeping worker sweeps (one with the
# local storage would mark these jobs purged without touching S3), and its quiet broker: the
# jobs stay queued until the test runs them.
@pytest.fixture(scope="module")
def s3_settings(base_env, quiet_broker_url, moto, aws_env) -> Settings:
    import os

    os.environ.update(aws_env)
    boto3.client("s3", endpoint_url=moto).create_bucket(Bucket=BUCKET)
    env = {
        **base_env,
        **aws_env,
        "POSEGEN_STORAGE_URL": f"s3://{BUCKET}/avatars",
        "POSEGEN_S3_ENDPOINT_URL": moto,
        "POSEGEN_BROKER_URL": quiet_broker_url,
    }
    return settings_from(env)


def client_for(settings: Settings) -> Any:
    from fastapi.testclient import TestClient

    from api.app import create_app

    return TestClient(create_app(settings))


@pytest.fixture
def storage(s3_settings: Settings) -> Storage:
    return storage_from_settings(s3_settings)


def keys(moto: str, job_id: str) -> set[str]:
    """The job's objects in the bucket, without the storage's prefix."""
    listing = boto3.client("s3", endpoint_url=moto).list_objects_v2(
        Bucket=BUCKET, Prefix="avatars/"
    )
    names = {item["Key"].removeprefix("avatars/") for item in listing.get("Contents", [])}
    return {name for name in names if job_id in name}


def test_the_photos_leave_s3_when_the_job_ends_and_the_output_when_deleted(
    s3_settings, storage, moto, make_account, sessions: sessionmaker[Session]
):
    photo = astronaut_png()
    with client_for(s3_settings) as app:
        account = make_account(credits=3)
        job_id = submit(
            app,
            account,
            image=photo,
            pose_template_id=None,
            files={"pose_image": ("pose.png", photo, "image/png")},
        ).json()["id"]
        photos = {f"inputs/{job_id}/image.png", f"inputs/{job_id}/pose.png"}
        assert keys(moto, job_id) == photos

        # What the worker does once it has recorded the job's end.
        output = finish(sessions, storage, job_id, ago=dt.timedelta(0))
        assert retention.purge_now(sessions, storage=storage, job_id=job_id)
        assert keys(moto, job_id) == {output}
        assert row(sessions, job_id).purged_at is not None

        response = app.delete(f"/v1/generations/{job_id}", headers=account.headers)
        assert response.status_code == 204
        assert keys(moto, job_id) == set()
        deleted = row(sessions, job_id)
        assert deleted.outputs == [] and deleted.deleted_at and deleted.purged_at
        gone = app.get(f"/v1/generations/{job_id}/outputs/0", headers=account.headers)
        assert gone.status_code == 404
        assert ledger(sessions, job_id) == [("charge", -1)]


def test_a_delete_storage_could_not_finish_is_finished_by_the_sweep(
    s3_settings, storage, moto, make_account, sessions: sessionmaker[Session]
):
    with client_for(s3_settings) as app:
        account = make_account(credits=3)
        job_id = submit(app, account, image=astronaut_png()).json()["id"]
    output = finish(sessions, storage, job_id, ago=dt.timedelta(0))
    # An API whose storage cannot be reached (nothing listens on port 9).
    unreachable = s3_settings.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:9"})
    with client_for(unreachable) as cut_off:
        response = cut_off.delete(f"/v1/generations/{job_id}", headers=account.headers)
        assert response.status_code == 204  # recorded: the sweep removes the files
        answer = cut_off.get(f"/v1/generations/{job_id}", headers=account.headers).json()
        assert answer["outputs"] == [] and answer["deleted_at"]
    pending = row(sessions, job_id)
    assert pending.deleted_at and pending.purged_at is None
    assert [out["key"] for out in pending.outputs] == [output]  # kept until the files go
    assert keys(moto, job_id) == {f"inputs/{job_id}/image.png", output}

    swept = retention.sweep(sessions, storage=storage, settings=s3_settings)
    assert swept.purged == 1 and swept.failed == 0
    assert keys(moto, job_id) == set()
    done = row(sessions, job_id)
    assert done.outputs == [] and done.purged_at and done.deleted_at == pending.deleted_at
    with sessions() as session:
        assert session.get_one(Generation, job_id).status == "completed"
