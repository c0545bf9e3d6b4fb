"""GET /v1/pose-templates/{id}/image: a template drawn as the skeleton a job conditions on."""

from __future__ import annotations

import io

from PIL import Image, ImageChops

from posegen.skeleton import draw_skeleton
from tests.factories import submit


def test_a_template_is_drawn_by_key_or_id(app, make_account):
    account = make_account()
    templates = app.get("/v1/pose-templates", headers=account.headers).json()["items"]
    waving = next(t for t in templates if t["key"] == "waving")
    by_key = app.get("/v1/pose-templates/waving/image", headers=account.headers)
    assert by_key.status_code == 200 and by_key.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(by_key.content))
    assert image.format == "PNG" and image.size == (512, 512)
    keypoints = [tuple(k) if k else None for k in waving["keypoints"]]
    expected = draw_skeleton(keypoints, width=512, height=512)
    assert ImageChops.difference(image.convert("RGB"), expected).getbbox() is None
    by_id = app.get(
        f"/v1/pose-templates/{waving['id']}/image?width=256&height=384", headers=account.headers
    )
    assert Image.open(io.BytesIO(by_id.content)).size == (256, 384)


def test_unknown_templates_sizes_and_keys_are_refused(app, make_account):
    account = make_account()
    missing = app.get("/v1/pose-templates/no-such-pose/image", headers=account.headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    too_big = app.get("/v1/pose-templates/waving/image?width=5000", headers=account.headers)
    assert too_big.status_code == 422
    assert app.get("/v1/pose-templates/waving/image").status_code == 401


def test_a_job_has_no_pose_before_it_starts(app, make_account):
    account = make_account()
    job = submit(app, account).json()  # no worker reads this broker: it stays queued
    answer = app.get(f"/v1/generations/{job['id']}/pose", headers=account.headers)
    assert answer.status_code == 404 and "not started" in answer.json()["error"]["message"]
