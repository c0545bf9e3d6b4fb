"""Celery tasks: as thin as web views. Ids in, domain calls, the unit of work commits."""

from __future__ import annotations

import logging
import os

from celery import Celery

from posegen import reconciler, retention, webhooks
from posegen.metrics import job_metrics
from posegen.queue import (
    DELIVER_WEBHOOK_TASK,
    GENERATE_REMOTE_TASK,
    GENERATE_TASK,
    PURGE_TASK,
    RECONCILE_TASK,
    SWEEP_STORAGE_TASK,
    SWEEP_WEBHOOKS_TASK,
)
from posegen.webhooks import deliver_message
from worker.context import context

log = logging.getLogger(__name__)


def generate(job_id: str | None = None, model_key: str | None = None) -> str:
    ctx = context()
    if ctx.restart_requested:
        # An earlier job leaked GPU memory, timed out or crashed: leave before claiming,
        # once the job before has been recorded. The message is not acked (late acks), so
        # Celery redelivers it to the replacement process.
        ctx.finisher.wait()
        log.warning("exiting so that Celery replaces this process (GPU memory or state)")
        os._exit(1)
    from worker.runner import run_next

    # The message says a job of `model_key` is ready; the scheduler picks which runs.
    log.debug("ready", extra={"job_id": job_id, "model_key": model_key})
    return run_next(ctx, ready_model=model_key, behind=ctx.behind)


def generate_remote(job_id: str | None = None, model_key: str | None = None) -> str:
    # The message says a hosted job is ready; the claim picks which (worker.remote: no torch).
    from worker.remote import remote, run_next_remote

    log.debug("hosted job ready", extra={"job_id": job_id})
    return run_next_remote(remote())


def deliver_webhook(delivery_id: str) -> str:
    # Handed to this process's sender, which has many in flight at once (one slow
    # endpoint holds none of the worker's slots): posegen.webhook_sender.
    context().webhook_sender.submit(delivery_id)
    return "handed to the sender"


def sweep_webhooks() -> int:
    ctx = context()
    with ctx.session() as session:
        due = webhooks.due_deliveries(session)
    for delivery_id in due:
        ctx.dispatcher.send(deliver_message(delivery_id))
    return len(due)


def reconcile() -> dict[str, int]:
    ctx = context()
    with ctx.session() as session:
        sweep = reconciler.reconcile(
            session,
            settings=ctx.settings,
            count_waiting=ctx.dispatcher.waiting,
        )
    for model_key in sweep.failed_models:
        job_metrics().finished.labels("failed", model_key).inc()
    if sweep.republished or sweep.requeued or sweep.failed:
        log.info("reconciled", extra=sweep.counts())
    return sweep.counts()


def purge_expired() -> int:
    with context().session() as session:
        return reconciler.purge_expired_idempotency_keys(session)


def sweep_storage() -> dict[str, int]:
    ctx = context()
    settings = ctx.settings
    # A run takes about one interval at most, so runs seldom overlap (they would skip
    # the jobs the other holds).
    sweep = retention.sweep(
        ctx.sessions,
        storage=ctx.storage,
        settings=settings,
        budget_seconds=settings.reconcile_interval,
    )
    if sweep.expired or sweep.purged or sweep.failed:
        log.info("storage swept", extra=sweep.counts())
    return sweep.counts()


def register(app: Celery) -> None:
    """The tasks, by the names the domain enqueues them with (posegen.queue)."""
    app.task(name=GENERATE_TASK)(generate)
    app.task(name=GENERATE_REMOTE_TASK)(generate_remote)
    app.task(name=DELIVER_WEBHOOK_TASK)(deliver_webhook)
    app.task(name=SWEEP_WEBHOOKS_TASK)(sweep_webhooks)
    app.task(name=RECONCILE_TASK)(reconcile)
    app.task(name=PURGE_TASK)(purge_expired)
    app.task(name=SWEEP_STORAGE_TASK)(sweep_storage)
