"""`output_format` and `output_quality`: each format through a real worker, stored, served
with its content type, and decoded by Pillow."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.factories import submit, wait_for

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("fields", "pillow", "content_type"),
    [
        ({}, "PNG", "image/png"),
        ({"output_format": "webp", "output_quality": 40}, "WEBP", "image/webp"),
        ({"output_format": "jpeg", "output_quality": 95}, "JPEG", "image/jpeg"),
    ],
)
def test_each_format_is_stored_served_and_decodes(
    app, make_account, gpu_worker, fields, pillow, content_type
):
    account = make_account()
    job = submit(app, account, seed=7, **fields).json()
    assert job["params"]["output_format"] == fields.get("output_format", "png")
    assert job["params"]["output_quality"] == fields.get("output_quality", 90)
    done = wait_for(app, account, job["id"])
    assert done["status"] == "completed", gpu_worker.tail()
    output = done["outputs"][0]
    assert output["content_type"] == content_type
    answer = app.get(output["url"], headers=account.headers)
    assert answer.status_code == 200 and answer.headers["content-type"] == content_type
    image = Image.open(io.BytesIO(answer.content))
    image.load()
    assert image.format == pillow and image.size == (output["width"], output["height"])


def test_quality_changes_a_lossy_output(app, make_account, gpu_worker):
    account = make_account()
    sizes = []
    for quality in (5, 100):
        job = submit(app, account, seed=3, output_format="jpeg", output_quality=quality).json()
        done = wait_for(app, account, job["id"])
        sizes.append(len(app.get(done["outputs"][0]["url"], headers=account.headers).content))
    assert sizes[0] < sizes[1]


@pytest.mark.parametrize(
    "fields",
    [{"output_format": "gif"}, {"output_quality": 0}, {"output_quality": 101}],
)
def test_out_of_bounds_is_refused(app, make_account, fields):
    answer = submit(app, make_account(), **fields)
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_request"


def test_the_pose_a_job_was_conditioned_on(app, make_account, gpu_worker, settings):
    from pathlib import Path

    from PIL import ImageChops

    from posegen.skeleton import draw_skeleton
    from tests.factories import astronaut_png

    account = make_account()
    job = submit(app, account, pose_template_id="waving").json()
    pose = f"/v1/generations/{job['id']}/pose"
    done = wait_for(app, account, job["id"])
    assert done["status"] == "completed", gpu_worker.tail()
    answer = app.get(pose, headers=account.headers)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    drawn = Image.open(io.BytesIO(answer.content)).convert("RGB")
    templates = app.get("/v1/pose-templates", headers=account.headers).json()["items"]
    waving = next(t for t in templates if t["key"] == "waving")["keypoints"]
    expected = draw_skeleton([tuple(k) if k else None for k in waving], width=128, height=128)
    assert ImageChops.difference(drawn, expected).getbbox() is None
    other = make_account()
    assert app.get(pose, headers=other.headers).status_code == 404
    # A pose extracted from the photo: drawn from what the extractor found.
    extracted = submit(app, account, image=astronaut_png(), pose_template_id=None).json()
    wait_for(app, account, extracted["id"])
    image = Image.open(
        io.BytesIO(
            app.get(f"/v1/generations/{extracted['id']}/pose", headers=account.headers).content
        )
    )
    assert image.size == (128, 128) and image.convert("L").getbbox() is not None
    # Deleted with the job's outputs.
    assert app.delete(f"/v1/generations/{job['id']}", headers=account.headers).status_code == 204
    assert app.get(pose, headers=account.headers).status_code == 404
    storage = Path(settings.storage_url.removeprefix("file://"))
    assert not (storage / "outputs" / job["id"]).exists()
    assert not (storage / "poses" / f"{job['id']}.png").exists()
