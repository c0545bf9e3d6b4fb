"""The bounded queue under concurrency: parallel submits against a real API process, then the
rows, the ledger, the turns and the stored inputs counted. A refused submit (429 queue_full,
503 overloaded) charges and stores nothing, and exactly the limit gets through."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from db.models import CreditLedger, Generation, QueueTurn, User
from tests.factories import png_bytes
from tests.processes import start_api
from tests.services import settings_from

PER_USER = 4  # the free tier's queued jobs
DEPTH = 7  # a model's queued jobs


# No worker takes these jobs: they are published where no process consumes.
@pytest.fixture(scope="module")
def env(base_env, quiet_broker_url):
    return {
        **base_env,
        "POSEGEN_BROKER_URL": quiet_broker_url,
        "POSEGEN_MAX_QUEUED_PER_USER": f"free={PER_USER}",
        "POSEGEN_MAX_QUEUE_DEPTH": str(DEPTH),
    }


@pytest.fixture(scope="module")
def api(env, db_engine, process_logs):
    proc, base = start_api(env, process_logs / "api-limits.log")
    yield base
    proc.stop()


def _post(base: str, key: str, model_key: str = "tiny-sd15-openpose") -> httpx.Response:
    return httpx.post(
        f"{base}/v1/generations",
        headers={"Authorization": f"Bearer {key}"},
        data={"model_key": model_key, "pose_template_id": "standing"},
        files={"image": ("p.png", png_bytes(), "image/png")},
        timeout=60,
    )


def _race(calls: list) -> list[httpx.Response]:
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def _counts(sessions, user_ids: list[str]) -> dict[str, object]:
    with sessions() as s:
        jobs = s.scalar(
            select(func.count()).select_from(Generation).where(Generation.user_id.in_(user_ids))
        )
        charges = s.scalar(
            select(func.count())
            .select_from(CreditLedger)
            .where(CreditLedger.user_id.in_(user_ids), CreditLedger.kind == "charge")
        )
        spent = s.scalar(
            select(func.sum(100 - User.credits)).where(User.id.in_(user_ids))
        )  # every account starts with 100
        turns = s.scalar(
            select(func.coalesce(func.sum(QueueTurn.queued), 0)).where(
                QueueTurn.user_id.in_(user_ids)
            )
        )
    return {"jobs": jobs, "charges": charges, "spent": spent, "turns": turns}


def _inputs(env) -> int:
    root = Path(settings_from(env).storage_url.removeprefix("file://")) / "inputs"
    return len(list(root.iterdir())) if root.exists() else 0


def test_a_user_at_their_tier_limit_gets_queue_full(api, env, make_account, sessions):
    account = make_account()
    answers = _race([lambda: _post(api, account.key) for _ in range(3 * PER_USER)])
    codes = Counter(r.status_code for r in answers)
    assert codes == {202: PER_USER, 429: 2 * PER_USER}, codes
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["Retry-After"]) >= 1
    assert _counts(sessions, [account.user_id]) == {
        "jobs": PER_USER, "charges": PER_USER, "spent": PER_USER, "turns": PER_USER,
    }  # fmt: skip
    assert _inputs(env) == PER_USER
    # Another user of the same tier is not held back by the first one's limit.
    assert _post(api, make_account().key).status_code == 202


def test_a_model_at_its_depth_gets_overloaded(api, env, make_account, sessions):
    with sessions() as s:  # what the test before left queued counts against the depth
        queued = s.scalar(
            select(func.count())
            .select_from(Generation)
            .where(Generation.status == "queued", Generation.model_key == "tiny-sd15-openpose")
        )
    room = DEPTH - queued
    before = _inputs(env)
    users = [make_account() for _ in range(4)]  # each under their own limit of PER_USER
    calls = [lambda a=a: _post(api, a.key) for a in users for _ in range(PER_USER - 1)]
    answers = _race(calls)
    codes = Counter(r.status_code for r in answers)
    assert codes == {202: room, 503: len(calls) - room}, codes
    refused = next(r for r in answers if r.status_code == 503)
    assert refused.json()["error"]["code"] == "overloaded"
    assert int(refused.headers["Retry-After"]) >= 1
    ids = [a.user_id for a in users]
    assert _counts(sessions, ids) == {"jobs": room, "charges": room, "spent": room, "turns": room}
    assert _inputs(env) == before + room
    # The depth is per model: another model's queue still takes jobs.
    assert _post(api, users[0].key, "tiny-sdxl-openpose").status_code == 202
