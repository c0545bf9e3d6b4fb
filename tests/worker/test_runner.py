"""The runner in process, on the tiny models, Postgres and local storage: a finished job is
recorded behind the next one (the Celery task's way), and what happens to it meanwhile."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import signals
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image
from sqlalchemy import select

from db.models import Generation, PoseTemplate, User
from db.session import make_session_factory
from db.types import utcnow
from posegen import jobs, lifecycle, reconciler
from posegen.queue import Dispatcher, make_producer
from posegen.settings import Settings
from posegen.storage import Storage, storage_from_settings
from tests.factories import astronaut_png
from tests.posegen.conftest import job_row, tiny_model
from worker import context as worker_context
from worker.context import WorkerContext
from worker.engine.engine import leaves_cpu_time
from worker.runner import Finisher, run_job

LEASE_S = 1.0
ASTRONAUT = astronaut_png()


class GatedStorage:
    """The real storage, whose writes of outputs wait while the gate is closed (or fail while
    `failing`): a record held up, as by a slow upload."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.open = threading.Event()
        self.open.set()
        self.failing = False
        self.failing_jobs: set[str] = set()  # jobs whose outputs fail alone
        self.puts: list[tuple[str, float]] = []  # each key written, and when (monotonic)

    def put(self, key: str, data: bytes, *, content_type: str = "image/png") -> None:
        if key.startswith("outputs/"):
            assert self.open.wait(30), "the gate was never opened"
            if self.failing or key.split("/")[1] in self.failing_jobs:
                raise OSError("storage unavailable")
        self.storage.put(key, data, content_type=content_type)
        self.puts.append((key, time.monotonic()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


@pytest.fixture(scope="module")
def ctx(settings: Settings, db_engine: object) -> Iterator[WorkerContext]:
    s = settings.model_copy(update={"job_lease_seconds": LEASE_S})
    storage = GatedStorage(storage_from_settings(s))
    context = WorkerContext(
        settings=s,
        sessions=make_session_factory(db_engine),  # type: ignore[arg-type]
        storage=storage,  # type: ignore[arg-type]
        dispatcher=Dispatcher(make_producer(s)),
    )
    context.warm()
    yield context
    context.finisher.wait()


@pytest.fixture
def gate(ctx: WorkerContext) -> Iterator[GatedStorage]:
    storage: GatedStorage = ctx.storage  # type: ignore[assignment]
    yield storage
    storage.failing = False
    storage.failing_jobs.clear()
    storage.open.set()
    ctx.finisher.wait()


def new_job(ctx: WorkerContext, user_id: str) -> str:
    """A queued 128 px job of the tiny model on the `standing` template, with no message (so
    no other worker takes it): its id."""
    with ctx.session() as session:
        template = session.scalars(select(PoseTemplate).where(PoseTemplate.key == "standing")).one()  # fmt: skip
        row = job_row(
            tiny_model(session), user_id, created_at=utcnow(), pose_template_id=template.id
        )
        # Its own photo: a finished job's inputs are removed.
        row["input_key"] = f"inputs/{row['id']}/image.png"
        ctx.storage.put(row["input_key"], ASTRONAUT)
        row["params"] |= {"guidance_scale": 7.5, "controlnet_conditioning_scale": 1.0, "strength": 1.0, "seed": 5}  # fmt: skip
        session.add(Generation(**row))
    return str(row["id"])


def claimed(ctx: WorkerContext, job_id: str) -> lifecycle.Claim:
    """The job, claimed for this worker as its task would (`runner.run_next` picks the job)."""
    with ctx.session() as session:
        claim = lifecycle.claim(
            session, job_id=job_id, worker_id=ctx.worker_id, lease_seconds=LEASE_S
        )
    assert claim is not None
    return claim


def state(ctx: WorkerContext, job_id: str) -> Generation:
    with ctx.sessions() as session:
        job = session.get(Generation, job_id)
        assert job is not None
        session.expunge(job)
        return job


@pytest.fixture
def user_id(make_account: Any) -> str:
    return str(make_account().user_id)


def test_a_finished_job_is_recorded_behind_the_next_one(ctx, gate, user_id):
    first, second = new_job(ctx, user_id), new_job(ctx, user_id)
    gate.open.clear()  # the first job's upload is held up
    assert run_job(ctx, claimed(ctx, first), behind=ctx.finisher) == "finishing"
    held = state(ctx, first)
    assert held.status == "processing" and held.worker_id == ctx.worker_id
    time.sleep(2 * LEASE_S)  # longer than the lease: the heartbeat keeps renewing it
    assert state(ctx, first).lease_expires_at > held.lease_expires_at
    with ctx.sessions() as session:  # nor does the reconciler take it back meanwhile
        assert reconciler.reconcile(session, settings=ctx.settings).requeued == 0
        session.rollback()

    threading.Timer(0.5, gate.open.set).start()
    # The next job claims and runs beside the pending record; handing its own record over
    # waits for the first one's.
    assert run_job(ctx, claimed(ctx, second), behind=ctx.finisher) == "finishing"
    assert state(ctx, second).started_at < state(ctx, first).finished_at
    assert ctx.finisher.wait() == "completed"
    for job_id in (first, second):
        done = state(ctx, job_id)
        assert done.status == "completed" and done.lease_expires_at is None
        assert done.outputs == [{"index": 0, "key": f"outputs/{job_id}/0.png", "width": 128, "height": 128, "content_type": "image/png"}]  # fmt: skip
        assert Image.open(io.BytesIO(ctx.storage.get(done.outputs[0]["key"]))).size == (128, 128)
    assert ctx.finisher.wait() is None  # nothing pending


def test_without_a_finisher_the_job_is_recorded_before_run_job_returns(ctx, gate, user_id):
    job_id = new_job(ctx, user_id)
    assert run_job(ctx, claimed(ctx, job_id)) == "completed"
    assert state(ctx, job_id).status == "completed"


def test_a_job_canceled_while_its_record_is_pending_keeps_no_output(ctx, gate, user_id, sessions):
    job_id = new_job(ctx, user_id)
    gate.open.clear()
    assert run_job(ctx, claimed(ctx, job_id), behind=ctx.finisher) == "finishing"
    with sessions() as session:
        jobs.cancel(session, job_id=job_id, user=session.get(User, user_id))
        session.commit()
    gate.open.set()
    assert ctx.finisher.wait() == "canceled"
    assert state(ctx, job_id).status == "canceled"
    with pytest.raises(FileNotFoundError):  # written, then deleted: not the job's any more
        ctx.storage.get(f"outputs/{job_id}/0.png")


def test_a_record_that_fails_leaves_the_job_to_its_lease(ctx, gate, user_id, sessions):
    job_id = new_job(ctx, user_id)
    gate.failing = True
    assert run_job(ctx, claimed(ctx, job_id), behind=ctx.finisher) == "finishing"
    assert ctx.finisher.wait() == "failed"  # logged; the task had returned long before
    left = state(ctx, job_id)
    assert left.status == "processing" and left.worker_id == ctx.worker_id
    time.sleep(LEASE_S + 0.5)  # its heartbeat stopped: the lease runs out
    with sessions() as session:
        reconciler.reconcile(session, settings=ctx.settings)
        session.commit()
    # Queued again by that sweep (no housekeeping worker runs on this module's database): not
    # lost, and no longer held by the process that failed to record it.
    again = state(ctx, job_id)
    assert again.worker_id != ctx.worker_id and again.status != "failed"


def test_a_time_limit_while_handing_over_the_record_stops_renewing_the_lease(ctx, gate, user_id):
    class Expiring(Finisher):
        def submit(self, record: Callable[[], str]) -> None:
            # What Celery's soft limit raises (from a signal) in a wait for the record before.
            raise SoftTimeLimitExceeded()

    job_id = new_job(ctx, user_id)
    with pytest.raises(SoftTimeLimitExceeded):
        run_job(ctx, claimed(ctx, job_id), behind=Expiring())
    assert state(ctx, job_id).status == "processing"
    time.sleep(LEASE_S + 3 * ctx.settings.heartbeat_seconds)
    # No heartbeat renews it: its lease has run out, unless a reconciler gave the job back
    # already (none sweeps this module's database).
    later, now = state(ctx, job_id), utcnow()
    held = later.worker_id == ctx.worker_id and later.lease_expires_at is not None
    assert not held or later.lease_expires_at < now


def test_a_leaving_worker_process_records_its_pending_job_first(ctx, gate, user_id, monkeypatch):
    import worker.celery_app  # noqa: F401 - connects the shutdown handlers

    monkeypatch.setattr(worker_context, "_context", ctx)
    monkeypatch.setattr(worker_context, "_context_pid", os.getpid())
    job_id = new_job(ctx, user_id)
    gate.open.clear()
    assert run_job(ctx, claimed(ctx, job_id), behind=ctx.finisher) == "finishing"
    opened_at: list[float] = []

    def open_gate() -> None:
        opened_at.append(time.monotonic())
        gate.open.set()

    threading.Timer(0.5, open_gate).start()
    # What billiard's pool process sends as it exits, in that process.
    signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
    returned_at = time.monotonic()
    assert opened_at and returned_at >= opened_at[0]
    assert state(ctx, job_id).status == "completed"


def test_the_pool_process_of_another_pid_leaves_the_pending_record_alone(ctx, monkeypatch):
    # The parent of a prefork pool gets `worker_shutdown` too; the context is its child's.
    monkeypatch.setattr(worker_context, "_context", ctx)
    monkeypatch.setattr(worker_context, "_context_pid", os.getpid() + 1)
    pending = threading.Event()
    ctx.finisher.submit(lambda: str(pending.wait(30)))
    started = time.monotonic()
    worker_context.finish_pending()
    assert time.monotonic() - started < 1  # it did not wait
    pending.set()
    assert ctx.finisher.wait() == "True"


def test_auto_records_behind_only_where_the_model_leaves_the_cpu_time():
    assert leaves_cpu_time("cuda:0", 0)
    assert not leaves_cpu_time("cpu", 0)  # torch's default: a thread on every core
    assert leaves_cpu_time("cpu", 1) == ((os.cpu_count() or 1) > 1)
    assert not leaves_cpu_time("cpu", os.cpu_count() or 1)


@pytest.mark.parametrize(("mode", "behind"), [("on", True), ("off", False), ("auto", False)])
def test_the_setting_picks_how_the_celery_task_records(ctx, mode, behind):
    # This process's engine runs on the CPU on torch's default threads.
    chosen = WorkerContext(
        settings=ctx.settings.model_copy(update={"record_behind": mode}),
        sessions=ctx.sessions,
        storage=ctx.storage,
        dispatcher=ctx.dispatcher,
    )
    chosen.engine = ctx.engine  # the warm one: no second engine
    assert (chosen.behind is chosen.finisher) if behind else (chosen.behind is None)
