"""The compile's warm-up (POSEGEN_COMPILE): a worker process compiles the models it serves at
every batch size up to POSEGEN_MAX_BATCH before it takes a job, says so when it is ready, and
its jobs then compile nothing; a call of a shape it did not warm runs under the configured time
limit. In process, on Postgres, local storage and the tiny models, with torch.compile's eager
backend: dynamo traces and guards as it does for inductor, without generating kernels."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from db.models import AiModel, Generation, PoseTemplate
from db.session import make_session_factory
from db.types import utcnow
from posegen import batch_claim, scheduler
from posegen.queue import Dispatcher, make_producer
from posegen.settings import Settings
from posegen.storage import storage_from_settings
from tests.factories import astronaut_png
from tests.posegen.conftest import job_row, tiny_model
from worker import batch
from worker.context import WorkerContext
from worker.engine.engine import Engine, EngineConfig
from worker.runner import run_next

TINY = "tiny-sd15-openpose"


TINY_XL = "tiny-sdxl-openpose"


@pytest.fixture
def ctx(settings: Settings, db_engine: object) -> Iterator[WorkerContext]:
    """A worker process's context serving the tiny model and one whose weights are missing,
    batching up to 2 images, with a compiling engine (not warmed yet)."""
    yield from _context(settings, db_engine, max_batch=2, models=["sd15-openpose", TINY])


@pytest.fixture
def two_models(settings: Settings, db_engine: object) -> Iterator[WorkerContext]:
    """A worker process's context serving both tiny models, batching up to 4 images."""
    yield from _context(settings, db_engine, max_batch=4, models=[TINY, TINY_XL])


def _context(
    settings: Settings, db_engine: object, *, max_batch: int, models: list[str]
) -> Iterator[WorkerContext]:
    s = settings.model_copy(
        update={"compile": True, "max_batch": max_batch, "worker_models": models}
    )
    context = WorkerContext(
        settings=s,
        sessions=make_session_factory(db_engine),  # type: ignore[arg-type]
        storage=storage_from_settings(s),
        dispatcher=Dispatcher(make_producer(s)),
    )
    config = EngineConfig(
        model_dir=s.model_dir, pose_backend="mediapipe", compile=True, compile_backend="eager"
    )
    context.__dict__["engine"] = Engine(config)  # the one `WorkerContext.engine` would build
    yield context
    context.engine.cache.clear()


def queue_job(
    ctx: WorkerContext, user_id: str, *, num_outputs: int = 1, model_key: str = TINY,
    **params: float,
) -> str:  # fmt: skip
    """A queued job of a tiny model at its catalog size and defaults, in its user's turn."""
    with ctx.session() as session:
        model = session.scalars(select(AiModel).where(AiModel.model_key == model_key)).one()
        template = session.scalars(select(PoseTemplate).where(PoseTemplate.key == "standing")).one()  # fmt: skip
        row = job_row(model, user_id, created_at=utcnow(), pose_template_id=template.id)
        row["input_key"] = f"inputs/{row['id']}/image.png"
        ctx.storage.put(row["input_key"], astronaut_png())
        row["params"] |= {
            "guidance_scale": model.guidance_scale, "controlnet_conditioning_scale": 1.0,
            "strength": 1.0, "seed": 5, "num_outputs": num_outputs, **params,
        }  # fmt: skip
        session.add(Generation(**row))
        session.flush()
        scheduler.joined(
            session, user_id=user_id, model_id=model.id, priority=model.priority,
            since=row["created_at"],
        )  # fmt: skip
    return str(row["id"])


def compiled_graphs() -> int:
    """The graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def records(caplog: pytest.LogCaptureFixture, message: str) -> list[Any]:
    return [r for r in caplog.records if r.getMessage() == message]


def finished(ctx: WorkerContext, job_id: str) -> Generation:
    with ctx.sessions() as session:
        job = session.get(Generation, job_id)
        assert job is not None
        return job


def test_the_worker_compiles_before_its_first_job_and_its_jobs_compile_nothing(
    ctx, make_account, caplog
):
    users = [str(make_account().user_id) for _ in range(3)]
    caplog.set_level(logging.INFO)
    before = compiled_graphs()
    ctx.warm()
    warmed = compiled_graphs()
    assert warmed > before  # the warm-up compiled
    # The model whose weights are missing is left out, with a warning; the tiny one compiled
    # at 1 and 2 images, and the process says it is ready with what it compiled.
    [skipped] = records(caplog, "model not compiled")
    assert skipped.model_key == "sd15-openpose" and "models pull sd15-openpose" in skipped.error
    [tiny] = records(caplog, "model compiled")
    assert (tiny.model_key, tiny.batch_sizes) == (TINY, [1, 2])
    [ready] = records(caplog, "worker process ready")
    assert ready.compiled == [TINY]
    assert ctx.engine.compiled_for(TINY, images=2, guidance_scale=7.5)

    # A job of one image; one of two (too many to join it: a call of its own); then two jobs of
    # one image each (one call of two): every shape was warmed, nothing compiles.
    alone, pair = queue_job(ctx, users[0]), queue_job(ctx, users[1], num_outputs=2)
    assert run_next(ctx, ready_model=None) == "completed"
    assert run_next(ctx, ready_model=None) == "completed"
    first, second = queue_job(ctx, users[0]), queue_job(ctx, users[2])
    assert run_next(ctx, ready_model=None) == "completed, completed"
    assert compiled_graphs() == warmed
    assert [b.jobs for b in records(caplog, "batch started")] == [1, 1, 2]
    for job_id, outputs in ((alone, 1), (pair, 2), (first, 1), (second, 1)):
        job = finished(ctx, job_id)
        assert job.status == "completed" and len(job.outputs) == outputs


def test_two_models_at_four_images_compile_every_job_in_the_warm_up(
    two_models, make_account, caplog
):
    """Each batch size, with guidance and without, and any ControlNet conditioning scale: for
    both models, within dynamo's limit of graphs (the UNet's and the ControlNet's classes are
    the two models' both)."""
    ctx = two_models
    users = [str(make_account().user_id) for _ in range(4)]
    caplog.set_level(logging.INFO)
    ctx.warm()
    warmed = compiled_graphs()
    assert {r.model_key for r in records(caplog, "model compiled")} == {TINY, TINY_XL}
    assert ctx.engine.compiled_for(TINY_XL, images=4, guidance_scale=1.0)
    jobs = [
        queue_job(ctx, users[0], controlnet_conditioning_scale=0.5),
        queue_job(
            ctx, users[1], model_key=TINY_XL, num_outputs=3, controlnet_conditioning_scale=0.7
        ),
        queue_job(ctx, users[2], model_key=TINY_XL, guidance_scale=1.0, num_outputs=2),
        queue_job(ctx, users[3], guidance_scale=0.5, controlnet_conditioning_scale=1.5),
    ]
    for _ in jobs:
        assert run_next(ctx, ready_model=None) == "completed"
    assert compiled_graphs() == warmed
    assert not records(caplog, "compile limit hit: calls of new shapes run uncompiled")
    assert all(finished(ctx, job_id).status == "completed" for job_id in jobs)


def test_a_call_the_warm_up_did_not_cover_runs_under_the_configured_time_limit(ctx, make_account):
    """Its own allowance counts steps (a minute here), not the minutes a compile takes."""
    user_id = str(make_account().user_id)
    cold = queue_job(ctx, user_id)
    with ctx.session() as session:
        claims = scheduler_claims(ctx, session)
    members = batch.start(ctx, claims)
    try:
        assert [m.job.id for m in members] == [cold]
        left = members[0].heartbeat.stops_at - time.time()
        assert ctx.settings.job_soft_time_limit - 5 < left <= ctx.settings.job_soft_time_limit
    finally:
        for member in members:
            member.heartbeat.stop()
    ctx.compile_warm_up()  # now warmed: a job has its own allowance again
    members = batch.start(ctx, claims)
    try:
        left = members[0].heartbeat.stops_at - time.time()
        assert left < 100 < ctx.settings.job_soft_time_limit
    finally:
        for member in members:
            member.heartbeat.stop()


def scheduler_claims(ctx: WorkerContext, session: Any) -> list[Any]:
    served = {TINY: tiny_model(session).id}
    return batch_claim.claim_batch(
        session, worker_id=ctx.worker_id, models=list(served.values()), lease_seconds=60,
        settings=ctx.settings, max_images=ctx.max_batch,
    )  # fmt: skip


def test_celery_waits_for_a_compiling_process_to_start(settings):
    """Celery kills a pool process that has not started within worker_proc_alive_timeout; one
    that compiles its models first takes minutes."""
    from celery import Celery

    from posegen.queue import configure_celery

    waits = {}
    for compile_ in (False, True):
        app = Celery("posegen")
        configure_celery(app, settings.model_copy(update={"compile": compile_}))
        waits[compile_] = app.conf.worker_proc_alive_timeout
    assert waits == {False: 120, True: 3600}
