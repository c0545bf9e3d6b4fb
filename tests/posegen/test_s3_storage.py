"""S3 storage through boto3 against moto_server (a real HTTP S3 endpoint on loopback)."""

from __future__ import annotations

import io
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError
from PIL import Image

from posegen.errors import StorageUnavailable
from posegen.storage.base import check_key
from posegen.storage.s3 import S3Storage
from tests.factories import astronaut_png, submit, wait_for
from tests.processes import Proc
from tests.services import free_port, settings_from

pytestmark = pytest.mark.slow
BUCKET = "posegen-test"


@pytest.fixture(scope="module")
def moto(moto_server: str) -> str:
    return moto_server


@pytest.fixture(scope="module")
def aws_env():
    return {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="module")
def s3_env(base_env, moto, aws_env):
    """The module's database and broker (`base_env`), consumed by its S3 worker alone."""
    import os

    os.environ.update(aws_env)
    boto3.client("s3", endpoint_url=moto).create_bucket(Bucket=BUCKET)
    return {
        **base_env,
        **aws_env,
        "POSEGEN_STORAGE_URL": f"s3://{BUCKET}/avatars",
        "POSEGEN_S3_ENDPOINT_URL": moto,
        "POSEGEN_RECORD_BEHIND": "off",  # the other way through Celery (the CPU's default)
    }


@pytest.fixture(scope="module")
def s3_worker(s3_env, db_engine, process_logs: Path):
    proc = Proc(["worker", "--concurrency", "1"], s3_env, process_logs / "s3-worker.log").start()
    yield proc
    proc.stop()


def test_storage_roundtrip_and_presigned_url(s3_env, moto):
    storage = S3Storage(bucket=BUCKET, prefix="unit", endpoint_url=moto, presign_expiry=60)
    storage.put("outputs/x/0.png", b"png-bytes")
    assert storage.get("outputs/x/0.png") == b"png-bytes"
    assert httpx.get(storage.presigned_url("outputs/x/0.png")).content == b"png-bytes"
    storage.check()
    storage.delete("outputs/x/0.png")
    with pytest.raises(ValueError):
        check_key("../etc/passwd")


def test_an_unreachable_store_is_unavailable_and_a_missing_key_is_not(s3_env, moto):
    """An outage is a 503 the caller may retry (and a worker waits out); a key that is not
    there is a real error, not an outage."""
    with pytest.raises(ClientError) as missing:
        S3Storage(bucket=BUCKET, prefix="unit", endpoint_url=moto).get("outputs/none/0.png")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"
    down = S3Storage(bucket=BUCKET, endpoint_url=f"http://127.0.0.1:{free_port()}")
    for call in (lambda: down.put("inputs/x/image.png", b"png"), down.check):
        with pytest.raises(StorageUnavailable) as caught:
            call()
        error = caught.value
        assert (error.status, error.code) == (503, "unavailable")
        assert int(error.headers["Retry-After"]) > 0


def test_job_output_redirects_to_a_presigned_url(s3_env, s3_worker, db_engine, make_account, moto):
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(settings_from(s3_env))) as client:
        account = make_account()
        job = submit(client, account, image=astronaut_png()).json()
        done = wait_for(client, account, job["id"])
        assert done["status"] == "completed", s3_worker.tail()
        response = client.get(
            done["outputs"][0]["url"], headers=account.headers, follow_redirects=False
        )
        assert response.status_code == 307
        location = response.headers["location"]
        assert location.startswith(moto) and "Signature" in location
        image = Image.open(io.BytesIO(httpx.get(location).content))
        assert image.size == (128, 128)
    keys = [
        o["Key"]
        for o in boto3.client("s3", endpoint_url=moto).list_objects_v2(
            Bucket=BUCKET, Prefix="avatars/"
        )["Contents"]
    ]
    # The output is kept; the photo went once the job completed.
    assert f"avatars/outputs/{job['id']}/0.png" in keys
    assert f"avatars/inputs/{job['id']}/image.png" not in keys
