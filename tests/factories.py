"""Small factories and waits for tests: an account, images, a submit, a stranded job, a
job followed to a state."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import CreditLedger


@dataclass
class Account:
    email: str
    user_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def png_bytes(
    size: tuple[int, int] = (96, 128), color: tuple[int, int, int] = (120, 90, 60)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def astronaut_png() -> bytes:
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="PNG")
    return buf.getvalue()


def submit(
    client: object,
    account: Account,
    *,
    image: bytes | None = None,
    headers: dict[str, str] | None = None,
    files: dict[str, object] | None = None,
    **fields: object,
) -> httpx.Response:
    merged = {"model_key": "tiny-sd15-openpose", "pose_template_id": "standing", **fields}
    data = {k: str(v) for k, v in merged.items() if v is not None}
    upload = {
        "image": ("photo.png", image if image is not None else png_bytes(), "image/png"),
        **(files or {}),
    }
    return client.post(
        "/v1/generations", headers={**account.headers, **(headers or {})}, data=data, files=upload
    )  # type: ignore[attr-defined,no-any-return]


def strand(session: Session, job_id: str, *, attempts: int, lease_expired_s: float) -> None:
    """Make a job look claimed `attempts` times by a worker that is gone: processing, with a
    lease that ran out `lease_expired_s` seconds ago (the caller commits)."""
    import datetime as dt

    from sqlalchemy import update

    from db.models import Generation

    session.execute(
        update(Generation)
        .where(Generation.id == job_id)
        .values(
            status="processing",
            worker_id="dead:1",
            attempts=attempts,
            lease_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=lease_expired_s),
        )
    )


def wait_for(
    client: object,
    account: Account,
    job_id: str,
    *,
    statuses: tuple[str, ...] = ("completed", "failed", "canceled"),
    timeout: float = 90,
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    job: dict[str, object] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/generations/{job_id}", headers=account.headers).json()  # type: ignore[attr-defined]
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job.get('status')} after {timeout}s")


def eventually(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Whether `check` holds within `timeout` seconds: for what another process does in its own
    time (a worker removes a job's photos and logs its end just after it records the end, which
    a poll may see first)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def ledger_kinds(sessions: Any, job_id: str) -> dict[str, int]:
    """A job's ledger rows by kind: {"charge": 1} for a job charged once, never refunded."""
    with sessions() as s:
        rows = s.execute(
            select(CreditLedger.kind, func.count())
            .where(CreditLedger.generation_id == job_id)
            .group_by(CreditLedger.kind)
        ).all()
    return {kind: int(count) for kind, count in rows}
