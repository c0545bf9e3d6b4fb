"""The one-query status poll agrees with the plain reads, on Postgres and on SQLite (demo)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import pytest
from sqlalchemy import insert, update
from sqlalchemy.orm import Session

from api.poll import poll
from db.fast import AsyncReads
from db.models import Generation, new_id
from db.types import utcnow
from posegen import accounts, jobs
from posegen.errors import NotFound, Unauthorized
from posegen.jobs import queries
from tests.posegen.conftest import job_row, make_job, tiny_model


def _poll(s: Session, *, authorization: str | None, job_id: str) -> dict[str, Any]:
    """`api.poll.poll` as the API awaits it, on `AsyncReads` over the session's database (an
    asyncpg pool on Postgres; SQLAlchemy's async engine on aiosqlite for the demo)."""
    url = s.get_bind().url.render_as_string(hide_password=False)

    async def go() -> dict[str, Any]:
        reads = AsyncReads(url, pool_size=2)
        await reads.start()
        try:
            return await poll(reads, authorization=authorization, job_id=job_id)
        finally:
            await reads.close()

    return asyncio.run(go())


def test_poll_matches_plain_reads(any_session: Session) -> None:
    s = any_session
    user = accounts.create_user(s, email="poll@example.com", credits=10)
    new_key = accounts.create_key(s, email="poll@example.com")
    key = new_key.raw
    other = accounts.create_user(s, email="other@example.com")
    auth = f"Bearer {key}"
    # Run order: priority high to low, then oldest first.
    ids = {
        "old_low": make_job(s, user.id, priority=1, age_s=30, status="queued"),
        "new_high": make_job(s, user.id, priority=9, age_s=1, status="queued"),
        "old_high": make_job(s, user.id, priority=9, age_s=20, status="queued"),
        "running": make_job(s, user.id, priority=9, age_s=60, status="processing"),
        "theirs": make_job(s, other.id, priority=5, age_s=10, status="queued"),
        "done": make_job(s, user.id, priority=5, age_s=90, status="completed"),
        "failed": make_job(s, user.id, priority=5, age_s=80, status="failed"),
    }
    # The poll reads a plain row: JSON columns and timestamps must come back as the ORM's.
    done, failed = s.get(Generation, ids["done"]), s.get(Generation, ids["failed"])
    assert done is not None and failed is not None
    done.outputs = [{"index": 0, "key": "outputs/x/0.png", "width": 128, "height": 128}]
    done.started_at, done.finished_at = utcnow() - dt.timedelta(seconds=5), utcnow()
    failed.error_code, failed.error_message = "worker_lost", "The worker died."
    s.commit()
    positions = {
        name: _poll(s, authorization=auth, job_id=job_id)["queue_position"]
        for name, job_id in ids.items()
        if name != "theirs"
    }
    assert positions == {
        "old_high": 0, "new_high": 1, "old_low": 3, "running": None, "done": None, "failed": None
    }  # fmt: skip
    # The ETA: the poll reads the model's run-time history itself when nothing is cached
    # (one completed job of 5 s; one job ahead of new_high, so two runs).
    queries._RUN_SECONDS.clear()
    eta = _poll(s, authorization=auth, job_id=ids["new_high"])["eta_seconds"]
    assert eta == pytest.approx(10, abs=0.5)
    for name, job_id in ids.items():
        if name != "theirs":
            polled = _poll(s, authorization=auth, job_id=job_id)
            assert polled == jobs.job_json(s, s.get(Generation, job_id))  # type: ignore[arg-type]

    with pytest.raises(NotFound):  # another user's job looks missing
        _poll(s, authorization=auth, job_id=ids["theirs"])
    with pytest.raises(NotFound):
        _poll(s, authorization=auth, job_id=new_id())
    with pytest.raises(NotFound):
        _poll(s, authorization=auth, job_id="not-a-uuid")
    for bad in (None, "Basic abc", "Bearer nope"):
        with pytest.raises(Unauthorized):
            _poll(s, authorization=bad, job_id=ids["old_high"])
    accounts.revoke_key(s, key_id_or_prefix=new_key.key.id)
    s.commit()
    with pytest.raises(Unauthorized, match="revoked"):
        _poll(s, authorization=auth, job_id=ids["old_high"])


def test_eta_estimate_is_cached_with_or_without_history(any_session: Session) -> None:
    """The run-time estimate behind the ETA is read once per RUN_SECONDS_TTL, "no history yet"
    included (otherwise every poll of a new model's queue costs a second query)."""
    s = any_session
    user = accounts.create_user(s, email="eta@example.com", credits=10)
    queries._RUN_SECONDS.clear()
    assert jobs.recent_run_seconds(s, "tiny-sd15-openpose") is None
    done = s.get(Generation, make_job(s, user.id, priority=5, age_s=9, status="completed"))
    assert done is not None
    done.started_at, done.finished_at = utcnow() - dt.timedelta(seconds=4), utcnow()
    s.commit()
    assert jobs.recent_run_seconds(s, "tiny-sd15-openpose") is None  # still the cached answer
    expired = time.monotonic() - queries.RUN_SECONDS_TTL
    queries._RUN_SECONDS["tiny-sd15-openpose"] = (expired, None)
    assert jobs.recent_run_seconds(s, "tiny-sd15-openpose") == pytest.approx(4, abs=0.5)
    queries._RUN_SECONDS.clear()


def test_a_position_past_the_cap_reads_as_the_cap(any_session: Session) -> None:
    """Past POSITION_CAP jobs, a position is the cap; jobs before it are counted exactly,
    the poll and the submit's answer agree, and positions follow the queue at once."""
    s = any_session
    user = accounts.create_user(s, email="deep@example.com", credits=10)
    key = accounts.create_key(s, email="deep@example.com").raw
    model, now, cap = tiny_model(s), utcnow(), jobs.POSITION_CAP
    rows = [  # in run order: row i has i jobs ahead
        job_row(model, user.id, created_at=now - dt.timedelta(seconds=cap + 2 - i))
        for i in range(cap + 2)
    ]
    s.execute(insert(Generation), rows)
    s.commit()
    auth = f"Bearer {key}"

    def polled(i: int) -> tuple[int, bool]:
        job = _poll(s, authorization=auth, job_id=rows[i]["id"])
        return job["queue_position"], job["queue_position_capped"]

    assert polled(cap + 1) == (cap, True)
    assert polled(cap - 2) == (cap - 2, False)
    assert polled(cap - 1) == (cap - 1, False)
    assert polled(cap) == (cap, True)
    for i in (0, cap - 1, cap + 1):  # the submit's answer (sync) agrees with the poll
        job = s.get(Generation, rows[i]["id"])
        assert job is not None
        assert jobs.job_json(s, job)["queue_position"] == polled(i)[0]

    # Ten jobs leave the queue: positions follow at once.
    s.execute(
        update(Generation)
        .where(Generation.id.in_([r["id"] for r in rows[:10]]))
        .values(status="processing")
    )
    s.commit()
    assert polled(cap - 2) == (cap - 12, False)
    assert polled(cap + 1) == (cap - 9, False)
