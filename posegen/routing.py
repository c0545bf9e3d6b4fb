"""Fallback ("Auto"): a local model may name a hosted twin (`ai_models.fallback_model_key`)
that takes its queued jobs when the GPUs cannot.

A job is routed when it is submitted while no worker serves its model (the API asks the
workers, `api.fleet`), or, swept by the reconciler, once it has waited longer than
POSEGEN_FALLBACK_AFTER_SECONDS. Either way it keeps its `model_key` and the price it was
charged, says where it went (`routed_to`), leaves its model's turn and joins the fallback's
(`route`), so the remote worker claims it and no local worker can. Not a change of status
(posegen.lifecycle holds those): the job stays queued, on another model. Off unless
configured: no `fallback_model_key`, no routing; POSEGEN_FALLBACK_AFTER_SECONDS unset, none
by waiting. A job of several outputs (`num_outputs` > 1) is never routed: a hosted model makes
one image a call.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import LOCAL, AiModel, Generation, status_is
from posegen import scheduler
from posegen.accounts import tier_rank
from posegen.queue import defer, generate_message
from posegen.settings import Settings

log = logging.getLogger(__name__)


def fallback_of(session: Session, model: AiModel) -> AiModel | None:
    """The hosted model a local one falls back to, when it names one that may take its jobs:
    hosted, enabled, not coming soon, of the same resolution (a job's parameters were resolved
    for its model's size) and of no higher tier (a free job must not run on a pro model). The
    seed refuses any other (`posegen.seeding`), but the table may change after: a fallback
    that does not fit is logged and not used."""
    if model.provider != LOCAL or not model.fallback_model_key:
        return None
    fallback = session.scalar(select(AiModel).where(AiModel.model_key == model.fallback_model_key))
    if fallback is None or fallback.provider == LOCAL or not fallback.enabled:
        return None
    if (
        fallback.coming_soon
        or fallback.resolution != model.resolution
        or (tier_rank(fallback.tier) > tier_rank(model.tier))
    ):
        log.warning(
            "fallback not used: it is coming soon, of another resolution or of a higher tier",
            extra={"model_key": model.model_key, "fallback": fallback.model_key},
        )
        return None
    return fallback


# A hosted provider makes one image a call: a job of several outputs stays on its GPUs.
_SINGLE_IMAGE = func.coalesce(Generation.params["num_outputs"].as_integer(), 1) == 1


def single_image(job: Generation) -> bool:
    """Whether a hosted fallback can run the job: one output (hosted models make one)."""
    return int((job.params or {}).get("num_outputs", 1)) == 1


def at_submit(
    session: Session, job: Generation, *, model: AiModel, unserved: Callable[[str], bool]
) -> None:
    """A new job of a local model that no worker serves goes to the model's fallback, before
    it joins any turn (its price is the model's, set already)."""
    if model.provider != LOCAL or not model.fallback_model_key or not single_image(job):
        return
    fallback = fallback_of(session, model)
    if fallback is None or not unserved(model.model_key):
        return
    job.model_id, job.provider, job.routed_to = fallback.id, fallback.provider, fallback.model_key
    log.info(
        "job routed to its fallback: no worker serves its model",
        extra={"job_id": job.id, "model_key": model.model_key, "routed_to": fallback.model_key},
    )


def route(
    session: Session, *, job_id: str, from_model_id: str, to: AiModel, settings: Settings
) -> Generation | None:
    """A queued job of the local model `from_model_id` moves to the hosted model `to` (its
    fallback): it leaves that model's turn and joins the fallback's, and its message goes to
    the remote queue once the caller commits; its price and `model_key` stay, `routed_to`
    says where it went. None when the job is no longer queued on that model (claimed,
    canceled, routed already): a claim that holds the row makes this wait, then find it
    taken, so a job is run by one side only."""
    job = session.scalars(
        update(Generation)
        .where(
            Generation.id == job_id,
            Generation.status == "queued",
            Generation.model_id == from_model_id,
        )
        .values(model_id=to.id, provider=to.provider, routed_to=to.model_key)
        .returning(Generation),
        execution_options={"synchronize_session": False, "populate_existing": True},
    ).one_or_none()
    if job is None:
        return None
    scheduler.left(session, user_id=job.user_id, model_id=from_model_id)
    scheduler.joined(
        session, user_id=job.user_id, model_id=to.id, priority=job.priority,
        since=job.created_at,
    )  # fmt: skip
    defer(session, generate_message(job, settings))
    return job


def route_waiting(session: Session, *, settings: Settings, now: dt.datetime, batch: int) -> int:
    """Route the queued jobs of models with a fallback that have waited longer than
    POSEGEN_FALLBACK_AFTER_SECONDS (oldest first); how many were. Rows a claim holds are
    skipped: that job is starting on a GPU."""
    after = settings.fallback_after_seconds
    if after is None:
        return 0
    fallbacks = {
        model.id: target
        for model in session.scalars(
            select(AiModel).where(
                AiModel.provider == LOCAL, AiModel.fallback_model_key.is_not(None)
            )
        ).all()
        if (target := fallback_of(session, model)) is not None
    }
    if not fallbacks:
        return 0
    waiting = session.execute(
        select(Generation.id, Generation.model_id)
        .where(
            status_is(Generation.status, "queued"),
            Generation.model_id.in_(list(fallbacks)),
            Generation.created_at < now - dt.timedelta(seconds=after),
            _SINGLE_IMAGE,
        )
        .order_by(Generation.created_at)
        .limit(batch)
        .with_for_update(skip_locked=True)
    ).all()
    routed = 0
    for job_id, model_id in waiting:
        job = route(
            session, job_id=str(job_id), from_model_id=str(model_id),
            to=fallbacks[str(model_id)], settings=settings,
        )  # fmt: skip
        if job is not None:
            routed += 1
            log.info(
                "job routed to its fallback after waiting",
                extra={"job_id": job.id, "model_key": job.model_key, "routed_to": job.routed_to},
            )
    return routed
