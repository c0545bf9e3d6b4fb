"""`posegen generate` as a user runs it: a process of its own, the key and the API's address
from POSEGEN_API_KEY and POSEGEN_API_URL, against a real API process and worker."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from PIL import Image

from tests.factories import astronaut_png, ledger_kinds, png_bytes
from tests.services import ROOT

pytestmark = pytest.mark.slow


def _generate(*args: str, api: str, key: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POSEGEN_API_URL": api, "POSEGEN_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "posegen.cli.main", "generate", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_generate_writes_the_image(live_api, gpu_worker, make_account, sessions, tmp_path):
    account = make_account(credits=3)
    photo = tmp_path / "me.png"
    photo.write_bytes(astronaut_png())
    out = tmp_path / "avatar.png"
    run = _generate(
        str(photo), "--model", "tiny-sd15-openpose", "--pose", "waving", "--steps", "4",
        "--seed", "11", "--prompt", "an astronaut", "--out", str(out), api=live_api, key=account.key,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr + gpu_worker.tail()
    assert f"wrote {out} (128x128)" in run.stdout
    assert "queued" in run.stderr and "completed" in run.stderr  # the bar's states
    assert Image.open(io.BytesIO(out.read_bytes())).size == (128, 128)
    from sqlalchemy import select

    from db.models import Generation

    with sessions() as s:
        job = s.scalars(select(Generation).where(Generation.user_id == account.user_id)).one()
    assert job.prompt == "an astronaut" and job.params["seed"] == 11
    assert ledger_kinds(sessions, job.id) == {"charge": 1}


def test_generate_several_outputs_writes_each(
    live_api, gpu_worker, make_account, sessions, tmp_path
):
    account = make_account(credits=3)
    photo = tmp_path / "me.png"
    photo.write_bytes(astronaut_png())
    out = tmp_path / "avatar.png"
    run = _generate(
        str(photo), "--model", "tiny-sd15-openpose", "--pose", "waving", "--outputs", "2",
        "--out", str(out), api=live_api, key=account.key,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr + gpu_worker.tail()
    second = tmp_path / "avatar-1.png"
    assert f"wrote {out} (128x128)" in run.stdout and f"wrote {second} (128x128)" in run.stdout
    assert out.read_bytes() != second.read_bytes()  # seeds seed and seed + 1
    from sqlalchemy import select

    from db.models import Generation, User

    with sessions() as s:
        job = s.scalars(select(Generation).where(Generation.user_id == account.user_id)).one()
        assert job.params["num_outputs"] == 2 and job.credit_cost == 2
        assert s.get_one(User, account.user_id).credits == 1  # one credit an image
    refused = _generate(str(photo), "--outputs", "5", api=live_api, key=account.key)
    assert refused.returncode == 2 and "--outputs" in refused.stderr


def test_generate_with_the_pose_of_another_photo(live_api, gpu_worker, make_account, tmp_path):
    account = make_account(credits=3)
    photo, pose = tmp_path / "me.png", tmp_path / "pose.png"
    photo.write_bytes(png_bytes())
    pose.write_bytes(astronaut_png())
    run = _generate(
        str(photo), "--model", "tiny-sd15-openpose", "--pose-image", str(pose),
        "--out", str(tmp_path / "o.png"), api=live_api, key=account.key,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "o.png").read_bytes().startswith(b"\x89PNG")


def test_a_failed_job_exits_1_with_its_message(live_api, gpu_worker, make_account, tmp_path):
    account = make_account(credits=3)
    photo = tmp_path / "blank.png"
    photo.write_bytes(png_bytes())  # nobody in it: no pose to extract
    run = _generate(str(photo), "--model", "tiny-sd15-openpose", api=live_api, key=account.key)
    assert run.returncode == 1
    assert "failed" in run.stderr and "(no_pose_detected)" in run.stderr


def test_refusals_exit_with_the_apis_message(live_api, make_account, tmp_path):
    photo = tmp_path / "me.png"
    photo.write_bytes(png_bytes())
    broke = make_account(credits=0)
    run = _generate(
        str(photo), "--model", "tiny-sd15-openpose", "--pose", "waving", api=live_api, key=broke.key
    )
    assert run.returncode == 1 and "error:" in run.stderr and "credits" in run.stderr
    run = _generate(
        str(photo), "--model", "tiny-sd15-openpose", "--pose", "waving", "--pose-image", str(photo),
        api=live_api, key=broke.key,
    )  # fmt: skip
    assert run.returncode == 2 and "not both" in run.stderr
    run = _generate(str(photo), "--model", "x", api="http://127.0.0.1:9", key=broke.key)
    assert run.returncode == 1 and "127.0.0.1:9" in run.stderr
