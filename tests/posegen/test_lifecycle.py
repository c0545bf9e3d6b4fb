"""The worker's transitions, statement by statement, on Postgres and on SQLite (demo).

A claim and a completion are what a worker spends between two jobs, so each is held to the
statements it needs: the claim's UPDATE answers the job (RETURNING) and one SELECT answers
the model and the template; the completion is one UPDATE."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from db.models import Generation, PoseTemplate, QueueTurn, UserTurn
from posegen import accounts, lifecycle
from posegen.queue import GENERATE_TASK
from posegen.settings import Settings
from tests.posegen.conftest import make_job, tiny_model


@contextmanager
def statements(session: Session) -> Iterator[list[str]]:
    """The SQL statements the session sends while the block runs (BEGIN/COMMIT excluded)."""
    seen: list[str] = []
    engine = session.get_bind()

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement.split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_claim_answers_the_job_and_its_catalog_rows_in_five_statements(
    any_session: Session,
) -> None:
    s = any_session
    user = accounts.create_user(s, email="claim@example.com", credits=10)
    template = s.scalars(select(PoseTemplate).where(PoseTemplate.key == "standing")).one()
    model = tiny_model(s)
    with_template = make_job(s, user.id, pose_template_id=template.id)
    without = make_job(s, user.id)
    s.commit()
    s.expunge_all()  # as in a worker: a fresh session, nothing loaded yet

    with statements(s) as sent:
        claim = lifecycle.claim(s, job_id=with_template, worker_id="w1", lease_seconds=60)
    # The job, its turn (one queued less), the user's last start and its copy on the user's
    # turns (their turn moves to the back), and the catalog rows.
    assert sent == ["UPDATE", "UPDATE", "INSERT", "UPDATE", "SELECT"]
    assert claim is not None
    assert (claim.job.id, claim.job.status, claim.job.worker_id) == (
        with_template,
        "processing",
        "w1",
    )
    assert claim.attempt == claim.job.attempts == 1
    assert claim.job.started_at is not None and claim.job.lease_expires_at is not None
    assert (claim.family, claim.base_model, claim.controlnet_model) == (
        model.family, model.base_model, model.controlnet_model,
    )  # fmt: skip
    assert claim.pose_keypoints == template.keypoints and len(template.keypoints) == 18

    other = lifecycle.claim(s, job_id=without, worker_id="w1", lease_seconds=60)
    assert other is not None and other.pose_keypoints is None
    assert other.base_model == model.base_model

    # A duplicate delivery: the job is not queued any more, one statement finds that out.
    with statements(s) as sent:
        assert lifecycle.claim(s, job_id=with_template, worker_id="w2", lease_seconds=60) is None
    assert sent == ["UPDATE"]
    s.commit()


def test_claim_next_on_postgres_is_one_statement(session: Session) -> None:
    """The next job by the scheduler's order, claimed in one round trip: the pick, the head,
    the claim, the user's turns and the catalog rows are one statement, and what it stored
    is what the turn-by-turn path stores."""
    s = session
    user = accounts.create_user(s, email="one@example.com", credits=10)
    template = s.scalars(select(PoseTemplate).where(PoseTemplate.key == "standing")).one()
    model = tiny_model(s)
    first = make_job(s, user.id, age_s=2, pose_template_id=template.id)
    second = make_job(s, user.id, age_s=1)
    s.commit()
    s.expunge_all()

    with statements(s) as sent:
        claim = lifecycle.claim_next(
            s, worker_id="w1", models=[model.id], lease_seconds=60, settings=Settings()
        )
    assert sent == ["WITH"]
    assert claim is not None and claim.job.id == first and claim.job.status == "processing"
    assert claim.pose_keypoints == template.keypoints and claim.base_model == model.base_model
    s.commit()
    turn = s.get_one(QueueTurn, (user.id, model.id), populate_existing=True)
    started = s.get_one(UserTurn, user.id, populate_existing=True).last_started_at
    second_created = s.get_one(Generation, second).created_at
    assert (turn.queued, turn.waiting_since) == (1, second_created)
    assert started == claim.job.started_at == turn.last_started_at


def test_complete_is_one_statement_and_only_for_the_worker_that_holds_the_job(
    any_session: Session,
) -> None:
    s = any_session
    user = accounts.create_user(s, email="complete@example.com", credits=10)
    job_id = make_job(s, user.id)
    assert lifecycle.claim(s, job_id=job_id, worker_id="w1", lease_seconds=60) is not None
    s.commit()
    s.expunge_all()
    outputs = [{"index": 0, "key": f"outputs/{job_id}/0.png", "width": 128, "height": 128}]

    # Another worker (its lease was taken over) cannot complete it.
    assert lifecycle.complete(s, job_id=job_id, worker_id="w2", outputs=outputs, steps=2) is None
    with statements(s) as sent:
        done = lifecycle.complete(s, job_id=job_id, worker_id="w1", outputs=outputs, steps=2)
    assert sent == ["UPDATE"]  # no webhook on this job: nothing to record
    assert done is not None
    assert (done.status, done.outputs, done.progress_step, done.progress_total) == (
        "completed", outputs, 2, 2,
    )  # fmt: skip
    assert done.finished_at is not None and done.lease_expires_at is None
    # Completed once: a second completion (a redelivered task) changes nothing.
    assert lifecycle.complete(s, job_id=job_id, worker_id="w1", outputs=[], steps=2) is None
    s.commit()
    s.expunge_all()
    assert lifecycle.claim(s, job_id=job_id, worker_id="w1", lease_seconds=60) is None


def test_heartbeat_and_release_only_touch_a_job_this_worker_runs(any_session: Session) -> None:
    s = any_session
    user = accounts.create_user(s, email="beat@example.com", credits=10)
    job_id = make_job(s, user.id)
    claim = lifecycle.claim(s, job_id=job_id, worker_id="w1", lease_seconds=1)
    assert claim is not None
    first_lease = claim.job.lease_expires_at
    s.commit()
    s.expunge_all()

    assert lifecycle.heartbeat(s, job_id=job_id, worker_id="w1", lease_seconds=60, step=1, total=2)
    assert not lifecycle.heartbeat(s, job_id=job_id, worker_id="w2", lease_seconds=60, step=2)
    # Without a step, the progress stays as the last beat wrote it.
    assert lifecycle.heartbeat(s, job_id=job_id, worker_id="w1", lease_seconds=60)
    s.commit()
    job = s.get_one(Generation, job_id, populate_existing=True)
    assert (job.progress_step, job.progress_total) == (1, 2)
    assert job.lease_expires_at is not None and first_lease is not None
    assert job.lease_expires_at > first_lease

    assert not lifecycle.release(s, job_id=job_id, worker_id="w2", settings=Settings())
    released = lifecycle.release(s, job_id=job_id, worker_id="w1", settings=Settings())
    assert released is not None and released.attempts == 1  # the next claim counts one more
    # Published again once the boundary commits: the job's message is in the outbox.
    outbox = [(m.task, m.args, m.queue) for m in s.info.pop("outbox")]
    assert outbox == [
        (GENERATE_TASK, (job_id, "tiny-sd15-openpose"), "generation.tiny-sd15-openpose")
    ]
    s.commit()
    job = s.get_one(Generation, job_id, populate_existing=True)
    assert (job.status, job.worker_id, job.lease_expires_at) == ("queued", None, None)
    # Released: no longer this worker's, so its heartbeat answers False (its run stops).
    assert not lifecycle.heartbeat(s, job_id=job_id, worker_id="w1", lease_seconds=60)
