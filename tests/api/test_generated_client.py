"""A client generated from /openapi.json by openapi-python-client (what a user who does not
take ours would do) submits a real photo as a file upload, polls the job to completion on a
real worker and downloads the image: the schema describes the uploads, the job and the image
well enough for a generator."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from tests.factories import astronaut_png, ledger_kinds

pytestmark = pytest.mark.slow
PACKAGE = "posegen_generated_client"


@pytest.fixture(scope="module")
def generated(live_api, tmp_path_factory):
    root = tmp_path_factory.mktemp("generated")
    schema = root / "openapi.json"
    schema.write_bytes(httpx.get(f"{live_api}/openapi.json").content)
    config = root / "config.yaml"
    # The generated code is imported as it is, not formatted. The tool reads binary bodies of
    # the types it knows; an image is one (docs/client.md says the same to users).
    config.write_text(
        "post_hooks: []\n"
        "content_type_overrides:\n"
        + "".join(
            f"  {t}: application/octet-stream\n" for t in ("image/png", "image/jpeg", "image/webp")
        )
    )
    run = subprocess.run(
        [
            sys.executable, "-m", "openapi_python_client", "generate", "--path", str(schema),
            "--meta", "none", "--output-path", str(root / PACKAGE), "--config", str(config),
            "--fail-on-warning",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
            del sys.modules[name]


def test_generated_client_submits_polls_and_downloads(
    generated, live_api, gpu_worker, make_account, sessions
):
    from posegen_generated_client import AuthenticatedClient
    from posegen_generated_client.api.generations import (
        get_generation,
        get_output,
        submit_generation,
    )
    from posegen_generated_client.models import BodySubmitGeneration, Job, JobStatus
    from posegen_generated_client.types import File

    account = make_account(credits=3)
    client = AuthenticatedClient(base_url=live_api, token=account.key)
    photo = File(
        payload=io.BytesIO(astronaut_png()), file_name="astronaut.png", mime_type="image/png"
    )
    body = BodySubmitGeneration(
        image=photo,
        model_key="tiny-sd15-openpose",
        pose_template_id="waving",
        seed=8,
        num_inference_steps=4,
    )
    submitted = submit_generation.sync_detailed(client=client, body=body, idempotency_key="gen-1")
    assert submitted.status_code == 202, submitted.content
    job = submitted.parsed
    assert isinstance(job, Job) and job.status == JobStatus.QUEUED and job.params.seed == 8

    deadline = time.monotonic() + 120
    while job.status not in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED):
        assert time.monotonic() < deadline, gpu_worker.tail()
        time.sleep(0.2)
        job = get_generation.sync(client=client, job_id=job.id)
        assert isinstance(job, Job)
    assert job.status == JobStatus.COMPLETED, job.error
    image = get_output.sync_detailed(client=client, job_id=job.id, index=job.outputs[0].index)
    assert image.status_code == 200
    assert Image.open(io.BytesIO(image.content)).size == (
        job.outputs[0].width,
        job.outputs[0].height,
    )
    # The replay with the same key is the same job, charged once.
    photo.payload.seek(0)
    replay = submit_generation.sync_detailed(client=client, body=body, idempotency_key="gen-1")
    assert replay.status_code == 200 and replay.parsed.id == job.id
    assert ledger_kinds(sessions, job.id) == {"charge": 1}
