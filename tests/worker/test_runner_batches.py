"""Several jobs in one pipeline call, in process (tests/worker/test_runner.py's tiny model,
Postgres and local storage): each ends on its own, whatever happens to the others."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from db.models import Generation, User
from posegen import credits, events, jobs, reconciler
from posegen.events import Event
from posegen.storage.keys import preview_key
from tests.factories import ledger_kinds
from tests.worker.test_runner import LEASE_S, claimed, ctx, gate, new_job, state, user_id
from worker.context import WorkerContext
from worker.runner import run_jobs

__all__ = ["ctx", "gate", "user_id"]  # the fixtures, shared


def batch_job(ctx: WorkerContext, user_id: str, **params: object) -> str:
    """A job of `new_job` that runs 4 steps, so that others can run on after it stops."""
    job_id = new_job(ctx, user_id)
    with ctx.session() as session:
        job = session.get(Generation, job_id)
        assert job is not None
        job.params = {**job.params, "num_inference_steps": 4, **params}
        session.flush()
        credits.charge(session, user_id=user_id, generation_id=job_id, amount=job.credit_cost)
    return job_id


def refunds(ctx: WorkerContext, job_id: str) -> int:
    return ledger_kinds(ctx.sessions, job_id).get("refund", 0)


def balance(ctx: WorkerContext, user_id: str) -> int:
    with ctx.sessions() as session:
        user = session.get(User, user_id)
        assert user is not None
        return user.credits


def test_a_job_whose_record_fails_leaves_its_batch_mates_recorded(ctx, gate, user_id):
    first, second = batch_job(ctx, user_id), batch_job(ctx, user_id)
    with ctx.session() as session:  # the claim below is its last attempt
        session.get(Generation, first).attempts = ctx.settings.max_attempts - 1  # type: ignore[union-attr]
    before = balance(ctx, user_id)
    gate.failing_jobs.add(first)
    with pytest.raises(OSError):  # raised once the other job is recorded (the task logs it)
        run_jobs(ctx, [claimed(ctx, first), claimed(ctx, second)])
    done = state(ctx, second)
    assert done.status == "completed" and [o["index"] for o in done.outputs] == [0]
    assert state(ctx, first).status == "processing"
    time.sleep(LEASE_S + 3 * ctx.settings.heartbeat_seconds)  # no heartbeat renews it
    with ctx.sessions() as session:
        reconciler.reconcile(session, settings=ctx.settings)
        session.commit()
    # Ended as a job alone whose record failed: its lease ran out, its last attempt spent.
    failed = state(ctx, first)
    assert failed.status == "failed" and failed.outputs in (None, [])
    assert refunds(ctx, first) == 1 and refunds(ctx, second) == 0
    assert balance(ctx, user_id) == before + failed.credit_cost


class Stream:
    """The live events the worker publishes; at `doomed`'s first step, that job is canceled
    (as its owner would, the `canceled` event in the stream) and the step waits until its
    heartbeat has seen the cancel, while the call runs on for the other job."""

    def __init__(self, ctx: WorkerContext, doomed: str, user_id: str) -> None:
        self.ctx, self.doomed, self.user_id = ctx, doomed, user_id
        self.events: list[Event] = []
        self.canceled_at = float("inf")  # when its heartbeat had seen the cancel (monotonic)
        self.lock = threading.Lock()

    def publish(self, published: list[Event]) -> None:
        with self.lock:
            self.events.extend(published)
        first = any(e.job_id == self.doomed and e.name == "progress" for e in published)
        if first and not any(e.name == "canceled" for e in self.events):
            with self.ctx.session() as session:
                jobs.cancel(session, job_id=self.doomed, user=session.get(User, self.user_id))
                taken = events.recorded(session)
            self.publish(taken)
            time.sleep(4 * self.ctx.settings.heartbeat_seconds)
            self.canceled_at = time.monotonic()

    def names(self, job_id: str) -> list[str]:
        return [e.name for e in self.events if e.job_id == job_id]


@pytest.fixture
def stream(ctx: WorkerContext) -> Iterator[None]:
    kept = ctx.dispatcher.events
    yield
    ctx.dispatcher.events = kept


def test_a_job_canceled_in_its_batch_publishes_and_stores_nothing_more(ctx, gate, user_id, stream):
    doomed, other = batch_job(ctx, user_id, preview=True), batch_job(ctx, user_id, preview=True)
    live = Stream(ctx, doomed, user_id)
    ctx.dispatcher.events = live  # type: ignore[assignment]
    assert run_jobs(ctx, [claimed(ctx, doomed), claimed(ctx, other)]) == "canceled, completed"
    names = live.names(doomed)
    assert "canceled" in names and "progress" not in names[names.index("canceled") :], names
    assert live.names(other).count("progress") >= 4  # the call ran on
    assert state(ctx, doomed).status == "canceled"
    # Its outputs were never written (not written, then deleted).
    assert not [key for key, _ in gate.puts if key.startswith(f"outputs/{doomed}/")]
    assert [key for key, _ in gate.puts if key.startswith(f"outputs/{other}/")]
    # Its previews stop with it (a step before the cancel may have stored one); the other's
    # go on.
    assert not [at for key, at in gate.puts if key == preview_key(doomed) and at > live.canceled_at]
    assert [at for key, at in gate.puts if key == preview_key(other) and at > live.canceled_at]
