"""The batch claim on real Postgres (and SQLite, the demo's database): after the next job,
the queued jobs one pipeline call can take with it, in the scheduler's order, up to
POSEGEN_MAX_BATCH images; incompatible ones (and the rest of their user's turn) are left; and
racing claimers take no job twice."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from db.models import Generation, QueueTurn
from db.session import make_session_factory
from db.types import utcnow
from posegen import batch_claim, credits, scheduler
from posegen.params import GenerationParams
from tests.posegen.test_scheduler import SETTINGS, claim_all, model, user


def queue(s: Session, user_id: str, *, age_s: float, key: str = "tiny-sd15-openpose",
          negative: str = "", **params: Any) -> str:  # fmt: skip
    """One queued job with every parameter a submit stores (steps 2 unless given)."""
    m = model(s, key)
    created = utcnow() - dt.timedelta(seconds=age_s)
    resolved = GenerationParams(**{"num_inference_steps": 2, **params}).resolve(
        steps=20, guidance_scale=7.5, width=m.width, height=m.height
    )
    job = Generation(
        user_id=user_id, model_id=m.id, model_key=m.model_key, status="queued", prompt="p",
        negative_prompt=negative, params=resolved.model_dump(), pose_source="image",
        input_key="inputs/x.png", credit_cost=m.credit_cost * resolved.num_outputs,
        priority=m.priority, outputs=[], created_at=created,
    )  # fmt: skip
    s.add(job)
    s.flush()
    credits.charge(s, user_id=user_id, generation_id=job.id, amount=job.credit_cost)
    scheduler.joined(s, user_id=user_id, model_id=m.id, priority=m.priority, since=created)
    s.commit()
    return job.id


def claim_batch(s: Session, max_images: int = 4, models: list[str] | None = None) -> list[str]:
    claims = batch_claim.claim_batch(
        s, worker_id="w", models=models or [model(s).id], lease_seconds=60, settings=SETTINGS,
        max_images=max_images,
    )  # fmt: skip
    s.commit()
    return [c.job.id for c in claims]


def status(s: Session, job_id: str) -> str:
    return s.scalars(select(Generation.status).where(Generation.id == job_id)).one()


def test_a_batch_takes_compatible_jobs_in_the_schedulers_order(any_session: Session) -> None:
    s = any_session
    a, b, c = user(s, "a"), user(s, "b"), user(s, "c")
    a1 = queue(s, a, age_s=10)
    b1 = queue(s, b, age_s=9)
    c1 = queue(s, c, age_s=8, num_inference_steps=3)  # another step count: not in one call
    c2 = queue(s, c, age_s=7)  # compatible, but behind c1 in c's own order
    a2 = queue(s, a, age_s=6)
    a3 = queue(s, a, age_s=5)
    b2 = queue(s, b, age_s=4)
    xl = queue(s, a, age_s=20, key="tiny-sdxl-openpose")  # another model
    # a1 first (the oldest), then the turns in order: b, c (its head cannot join: c is
    # passed over, c2 stays behind c1), a again, b again: four images.
    assert claim_batch(s) == [a1, b1, a2, b2]
    assert [status(s, j) for j in (c1, c2, a3, xl)] == ["queued"] * 4
    # The rest, one at a time: the scheduler's order is intact.
    assert claim_all(s, [model(s).id]) == [c1, a3, c2]


def test_each_kind_of_difference_keeps_a_job_out(any_session: Session) -> None:
    s = any_session
    head_user = user(s, "head")
    head = queue(s, head_user, age_s=30)
    others = [
        queue(s, user(s, f"u{i}"), age_s=20 - i, **change)
        for i, change in enumerate(
            [
                {"guidance_scale": 5.0},
                {"strength": 0.5},
                {"controlnet_conditioning_scale": 0.5},
                {"negative": "blurry"},
            ]
        )
    ]
    same = queue(s, user(s, "same"), age_s=1, seed=5, prompt="x", output_format="webp")
    assert claim_batch(s) == [head, same]  # seed, prompt and format differ per job
    assert [status(s, j) for j in others] == ["queued"] * 4


def test_a_batch_counts_images_not_jobs(any_session: Session) -> None:
    s = any_session
    u, v, w = user(s, "u"), user(s, "v"), user(s, "w")
    two = queue(s, u, age_s=10, num_outputs=2)
    three = queue(s, v, age_s=9, num_outputs=3)  # 2 + 3 > 4: v is passed over
    other_two = queue(s, w, age_s=8, num_outputs=2)
    assert claim_batch(s) == [two, other_two]
    assert status(s, three) == "queued"
    assert claim_batch(s, max_images=1) == [three]  # the head runs whatever its size


def test_max_one_image_claims_as_claim_next_does(any_session: Session) -> None:
    s = any_session
    u = user(s, "u")
    jobs = [queue(s, u, age_s=10 - i) for i in range(3)]
    assert claim_batch(s, max_images=1) == jobs[:1]
    assert claim_batch(s, max_images=8) == jobs[1:]


def test_racing_batch_claimers_take_no_job_twice(session: Session, db_engine: Engine) -> None:
    users = [user(session, f"r{i}") for i in range(8)]
    jobs = {queue(session, u, age_s=100 - i * 8 - k) for i, u in enumerate(users) for k in range(5)}
    model_id = model(session).id
    sessions = make_session_factory(db_engine)
    claimed: list[list[str]] = []
    start = threading.Barrier(6)

    def claimer() -> None:
        start.wait()
        with sessions() as s:
            while batch := claim_batch(s, models=[model_id]):
                claimed.append(batch)

    threads = [threading.Thread(target=claimer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    every = [job_id for batch in claimed for job_id in batch]
    assert sorted(every) == sorted(jobs)  # each job once, none left
    assert all(len(batch) <= 4 for batch in claimed)
    assert len(claimed) < len(jobs)  # they did run in batches
    session.expire_all()
    rows = session.execute(
        select(Generation.status, Generation.attempts, func.count()).group_by(
            Generation.status, Generation.attempts
        )
    ).all()
    assert rows == [("processing", 1, 40)]
    queued = session.scalar(select(func.coalesce(func.sum(QueueTurn.queued), 0)))
    assert queued == 0


@pytest.mark.parametrize("max_images", [2, 3])
def test_the_batch_stops_at_max_images(any_session: Session, max_images: int) -> None:
    s = any_session
    u = user(s, "u")
    jobs = [queue(s, u, age_s=10 - i) for i in range(4)]
    assert claim_batch(s, max_images=max_images) == jobs[:max_images]


def test_jobs_tried_before_run_alone(any_session: Session) -> None:
    """A job whose last attempt ended with its worker process (a crash it may have caused)
    takes no batch-mates with it, as head or member."""
    s = any_session
    a, b, c = user(s, "a"), user(s, "b"), user(s, "c")
    retried = queue(s, a, age_s=10)
    fresh = queue(s, b, age_s=9)
    tried_member = queue(s, c, age_s=8)
    for job_id in (retried, tried_member):  # each requeued once, its attempt spent
        s.get(Generation, job_id).attempts = 1  # type: ignore[union-attr]
    s.commit()
    assert claim_batch(s) == [retried]  # the head, alone
    assert claim_batch(s) == [fresh]  # c's head was tried: c's turn is passed over
    assert claim_batch(s) == [tried_member]
    rows = s.execute(select(Generation.id, Generation.attempts, Generation.status)).all()
    assert sorted((a, st) for _, a, st in rows) == [
        (1, "processing"),
        (2, "processing"),
        (2, "processing"),
    ]
