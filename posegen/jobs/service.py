"""What changes jobs on a caller's behalf: submit (validate, charge, record, send) and cancel."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, event, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, SessionTransaction

from db.models import LOCAL, AiModel, Generation, IdempotencyKey, PoseTemplate, User, new_id
from db.types import utcnow
from posegen import catalog, credits, events, lifecycle, routing, scheduler, webhooks
from posegen.accounts import tier_rank
from posegen.errors import (
    AlreadyFinished,
    IdempotencyKeyReused,
    InvalidRequest,
    ModelUnavailable,
    PosegenError,
    TierRequired,
)
from posegen.images import CheckedImage, check_upload
from posegen.jobs.queries import get_for_user, job_json, recent_run_seconds
from posegen.jobs.request import GenerationRequest
from posegen.queue import defer, generate_message
from posegen.ratelimit import check_rate_limit
from posegen.settings import Settings
from posegen.storage import Storage
from posegen.webhook_urls import check_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submitted:
    job: Generation
    created: bool  # False: an idempotent replay of an earlier request
    # The job's JSON as it entered the queue (its position included): the `queued` event's
    # data, and the submit's answer. None for a replay.
    answer: dict[str, Any] | None = None


def check_model_access(model: AiModel, user: User) -> None:
    if model.coming_soon or not model.enabled:
        state = "coming soon" if model.coming_soon else "disabled"
        raise ModelUnavailable(f"Model {model.model_key!r} is {state}.")
    if tier_rank(user.tier) < tier_rank(model.tier):
        raise TierRequired(
            f"Model {model.model_key!r} needs the {model.tier!r} tier; yours is {user.tier!r}."
        )


def submit(
    session: Session,
    *,
    user: User,
    request: GenerationRequest,
    storage: Storage,
    settings: Settings,
    idempotency_key: str | None = None,
    unserved: Callable[[str], bool] | None = None,
) -> Submitted:
    """Validate, charge and record a job, and defer its message until the commit.

    The cheap refusals (the request's bounds, a replay, the catalog, the balance and rate
    limit as read, the webhook URL's form) come before the expensive work (the webhook host's
    DNS lookup, decoding and fitting the images), so a refused caller costs little. Everything
    this writes, the job row, its stored inputs, the charge and the message, commits together
    or not at all: a replay or a refusal leaves no row, no file and no charge behind.
    `unserved(model_key)`: whether no worker serves a local model now (its job then goes to
    the model's hosted fallback, if it names one: posegen.routing)."""
    request.validate()
    fingerprint = request.fingerprint()
    if idempotency_key is not None:
        replay = _replay(session, user_id=user.id, key=idempotency_key, fingerprint=fingerprint)
        if replay is not None:
            return Submitted(job=replay, created=False)
    model, template = _allowed_choices(session, request, user=user, settings=settings)
    webhook_url = _checked_webhook_url(request, settings)
    image, pose = _fitted_images(request, settings, size=(model.width, model.height))
    job = _new_job(
        request, user=user, model=model, template=template, pose=pose, webhook_url=webhook_url
    )
    if unserved is not None:
        routing.at_submit(session, job, model=model, unserved=unserved)
    winner = _record(session, job, key=idempotency_key, fingerprint=fingerprint, settings=settings)
    if winner is not None:
        return Submitted(job=winner, created=False)
    _store_inputs(session, storage, _inputs(job, image=image, pose=pose))
    _charge_and_send(session, job, user=user, settings=settings)
    answer = job_json(session, job)
    events.record(session, events.Event(job_id=job.id, name="queued", data=answer))
    return Submitted(job=job, created=True, answer=answer)


def _allowed_choices(
    session: Session, request: GenerationRequest, *, user: User, settings: Settings
) -> tuple[AiModel, PoseTemplate | None]:
    """The model and pose template asked for, once the caller may use them: the model's state
    and tier, then quick refusals from what was read with the key (the balance, the rate
    limit); the charge is what decides (`_charge_and_send`)."""
    model, template = catalog.submit_choices(session, request.model_key, request.pose_template_id)
    check_model_access(model, user)
    if model.provider != LOCAL and request.params.num_outputs > 1:
        # A hosted provider makes one image a call: more would be charged and never made.
        raise InvalidRequest(f"Model {model.model_key!r} is hosted: num_outputs must be 1.")
    credits.check_balance(user, model.credit_cost * request.params.num_outputs)
    check_rate_limit(session, user=user, settings=settings)
    return model, template


def _checked_webhook_url(request: GenerationRequest, settings: Settings) -> str | None:
    if not request.webhook_url:
        return None
    return check_url(request.webhook_url, allow_private=settings.webhook_allow_private)


def _fitted_images(
    request: GenerationRequest, settings: Settings, *, size: tuple[int, int]
) -> tuple[CheckedImage, CheckedImage | None]:
    """The photo and the pose photo, decoded, checked and fitted to the model's size."""
    image = check_upload(request.image, max_pixels=settings.max_image_pixels, fit_to=size)
    if request.pose_image is None:
        return image, None
    pose = check_upload(
        request.pose_image, max_pixels=settings.max_image_pixels, field="pose_image", fit_to=size
    )
    return image, pose


def _new_job(
    request: GenerationRequest,
    *,
    user: User,
    model: AiModel,
    template: PoseTemplate | None,
    pose: CheckedImage | None,
    webhook_url: str | None,
) -> Generation:
    """The job row a request stands for, with the model's defaults filled in."""
    now = utcnow()
    job = Generation(
        id=new_id(),
        user_id=user.id,
        model_id=model.id,
        model_key=model.model_key,
        status="queued",
        prompt=request.prompt if request.prompt else model.default_prompt,
        negative_prompt=(
            request.negative_prompt
            if request.negative_prompt is not None
            else model.negative_prompt
        ),
        params=request.params.resolve(
            steps=model.default_steps,
            guidance_scale=model.guidance_scale,
            width=model.width,
            height=model.height,
        ).model_dump(),
        pose_source="template" if template else ("pose_image" if pose is not None else "image"),
        pose_template_id=template.id if template else None,
        credit_cost=model.credit_cost * request.params.num_outputs,
        priority=model.priority,
        provider=model.provider,
        webhook_url=webhook_url,
        webhook_events=webhooks.parse_choices(request.webhook_events),
        outputs=[],
        created_at=now,
        published_at=now,
        deadline_at=(
            now + dt.timedelta(seconds=request.deadline_seconds)
            if request.deadline_seconds is not None
            else None
        ),
    )
    job.input_key = f"inputs/{job.id}/image.png"
    job.pose_image_key = f"inputs/{job.id}/pose.png" if pose is not None else None
    return job


def _record(
    session: Session, job: Generation, *, key: str | None, fingerprint: str, settings: Settings
) -> Generation | None:
    """Insert the job (with its Idempotency-Key, if any); None when it is in, or the job of a
    concurrent twin request that won the key."""
    if key is not None:
        return _record_with_key(session, job, key=key, fingerprint=fingerprint, settings=settings)
    session.add(job)
    session.flush()
    return None


def _record_with_key(
    session: Session, job: Generation, *, key: str, fingerprint: str, settings: Settings
) -> Generation | None:
    """Insert the job and its Idempotency-Key in a savepoint; None when they are in, or the
    job of a concurrent twin request that won the key (its unique index).

    The job is added inside the savepoint, so rolling the savepoint back takes it out of the
    session too: added before, it would stay pending, and the caller's commit would insert it
    after all, a job without a charge, an input or a message."""
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
            session.add(
                IdempotencyKey(
                    user_id=job.user_id,
                    key=key,
                    fingerprint=fingerprint,
                    generation_id=job.id,
                    expires_at=utcnow() + dt.timedelta(seconds=settings.idempotency_ttl_seconds),
                )
            )
            session.flush()
    except IntegrityError:
        winner = _replay(session, user_id=job.user_id, key=key, fingerprint=fingerprint)
        if winner is None:
            raise
        return winner
    return None


def _inputs(job: Generation, *, image: CheckedImage, pose: CheckedImage | None) -> dict[str, bytes]:
    """The files a job's run reads, by their storage key."""
    inputs = {job.input_key: image.png}
    if pose is not None and job.pose_image_key is not None:
        inputs[job.pose_image_key] = pose.png
    return inputs


def _store_inputs(session: Session, storage: Storage, inputs: dict[str, bytes]) -> None:
    """Put a job's inputs in storage, and take them out again if its transaction does not
    commit (a refused charge, the rate limit's second count, a failed commit): storage is not
    part of the transaction, so the session's rollback removes what this stored."""
    # Listening for the session's life: the keys are forgotten at the commit, and removed at
    # the rollback of the whole transaction (not of a savepoint), whichever comes first.
    stored: list[str] = []

    def committed(_: Session) -> None:
        stored.clear()

    def rolled_back(_: Session, previous: SessionTransaction) -> None:
        if previous.parent is not None:  # a savepoint: the transaction goes on
            return
        for key in stored:
            try:
                storage.delete(key)
            except (OSError, PosegenError) as error:  # storage down: the rollback stands
                log.warning("could not remove an uncommitted input %s: %s", key, error)
        stored.clear()

    event.listen(session, "after_commit", committed)
    event.listen(session, "after_soft_rollback", rolled_back)
    for key, data in inputs.items():
        storage.put(key, data)
        stored.append(key)


def _replay(session: Session, *, user_id: str, key: str, fingerprint: str) -> Generation | None:
    if len(key) > 255 or not key.strip() or "\x00" in key:
        raise InvalidRequest("Idempotency-Key must be 1 to 255 characters.")
    row = session.scalar(
        select(IdempotencyKey).where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == key)
    )
    if row is None:
        return None
    if row.expires_at <= utcnow():
        # A statement, not `session.delete`: a concurrent twin may have deleted it already.
        session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.id == row.id, IdempotencyKey.expires_at <= utcnow()
            ),
            execution_options={"synchronize_session": False},
        )
        session.expunge(row)
        return None
    if row.fingerprint != fingerprint:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was used with a different request; use a new key."
        )
    return session.get(Generation, row.generation_id)


def _charge_and_send(session: Session, job: Generation, *, user: User, settings: Settings) -> None:
    """Charge the job, queue it and defer its message to the commit.

    Last in a submit, each step holding a lock until the caller commits (nothing slow may
    come after them). The charge locks the user's balance row, so one user's concurrent
    submits take turns here and another user's go on; under it the rate limit and the user's
    queued jobs are counted with this job among them, exact under concurrency. The model's
    queue depth is read under a lock of its own, taken after the user's row (the order every
    transaction takes them in: posegen.scheduler), so a user waiting for their own row holds
    up no one else."""
    credits.charge(session, user_id=user.id, generation_id=job.id, amount=job.credit_cost)
    check_rate_limit(session, user=user, settings=settings, own=1)
    wait = scheduler.retry_after(recent_run_seconds(session, job.model_key))
    scheduler.check_depth(
        session, model_id=job.model_id, model_key=job.model_key, settings=settings,
        retry_after=wait,
    )  # fmt: skip
    scheduler.joined(
        session, user_id=user.id, model_id=job.model_id, priority=job.priority,
        since=job.created_at,
    )  # fmt: skip
    scheduler.check_user_queue(session, user=user, settings=settings, retry_after=wait)
    defer(session, generate_message(job, settings))


def cancel(session: Session, *, job_id: str, user: User) -> Generation:
    """Cancel the caller's job, refunded (`lifecycle.cancel`); AlreadyFinished if it ended."""
    job = get_for_user(session, job_id=job_id, user=user)
    if lifecycle.cancel(session, job_id=job.id) is None:
        raise AlreadyFinished(f"Generation {job.id} is {job.status} already.")
    return job
