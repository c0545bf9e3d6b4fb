"""A job's events, told to whoever follows it: its live event stream (`posegen.events`) and,
for the events its owner chose, its webhook (`posegen.webhooks`). One vocabulary for both, as
the transitions name them (`posegen.lifecycle`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from posegen import events, webhooks

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from db.models import Generation


def announce(session: Session, job: Generation, name: str) -> events.Event:
    """Record the event `name` of `job` as it stands now; sent once the caller commits. A
    `queued` event carries the job's position in the queue."""
    render = {}
    if name == "queued":
        from posegen.jobs.queries import queue_position

        render["queue_position"] = queue_position(session, job)
    event = events.job_event(session, job, name, **render)
    webhooks.record_event(session, job=job, event_type=f"generation.{name}", data=event.data)
    return event


def progress_webhook(session: Session, job: Generation, *, step: int, total: int) -> None:
    """Record a `generation.progress` webhook for the job at this step, if its owner chose
    progress (the worker calls this at most every POSEGEN_WEBHOOK_PROGRESS_INTERVAL)."""
    if webhooks.takes(job, webhooks.PROGRESS):
        data = events.progress(job, step=step, total=total).data
        webhooks.record_event(session, job=job, event_type=webhooks.PROGRESS, data=data, seq=step)
