"""Generation jobs as the API sees them: submit, read, list, cancel, and the job JSON."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import math
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Integer,
    Select,
    and_,
    bindparam,
    case,
    delete,
    event,
    func,
    literal_column,
    or_,
    select,
    tuple_,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, SessionTransaction

from db.fast import AsyncReads, DriverQuery
from db.models import (
    TERMINAL_STATUSES,
    AiModel,
    ApiKey,
    Generation,
    IdempotencyKey,
    PoseTemplate,
    User,
    new_id,
    status_is,
)
from db.types import utcnow
from posegen import catalog, credits, lifecycle, webhooks
from posegen.accounts import bearer_key_hash, live_key, tier_rank
from posegen.errors import (
    AlreadyFinished,
    IdempotencyKeyReused,
    InvalidRequest,
    ModelUnavailable,
    NotFound,
    PosegenError,
    TierRequired,
)
from posegen.images import CheckedImage, check_upload
from posegen.queue import defer, generate_message
from posegen.ratelimit import check_rate_limit
from posegen.render import POSITION_CAP, RENDERED_COLUMNS, JobLike, render_job
from posegen.settings import Settings
from posegen.storage import Storage

log = logging.getLogger(__name__)
MAX_PROMPT_CHARS = 1000


@dataclass(frozen=True)
class GenerationRequest:
    """What a caller asks for; bounds are checked by `validate`."""

    model_key: str
    image: bytes
    prompt: str | None = None
    negative_prompt: str | None = None
    pose_template_id: str | None = None
    pose_image: bytes | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    controlnet_conditioning_scale: float = 1.0
    strength: float = 0.75
    seed: int | None = None
    webhook_url: str | None = None

    def validate(self) -> None:
        for name in ("model_key", "prompt", "negative_prompt", "pose_template_id", "webhook_url"):
            value = getattr(self, name)
            if value is not None and "\x00" in value:
                raise InvalidRequest(f"{name} contains a NUL character.")
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if value is not None and len(value) > MAX_PROMPT_CHARS:
                raise InvalidRequest(f"{name} is longer than {MAX_PROMPT_CHARS} characters.")
        _bounded("num_inference_steps", self.num_inference_steps, 1, 150)
        _bounded("guidance_scale", self.guidance_scale, 0.0, 30.0)
        _bounded("controlnet_conditioning_scale", self.controlnet_conditioning_scale, 0.0, 2.0)
        _bounded("strength", self.strength, 0.0, 1.0)
        _bounded("seed", self.seed, 0, 2**32 - 1)
        if self.pose_template_id and self.pose_image is not None:
            raise InvalidRequest("Send at most one of pose_template_id and pose_image.")

    def fingerprint(self) -> str:
        """A digest of everything that defines the request (images by their hash)."""
        fields = asdict(self)
        for name in ("image", "pose_image"):
            raw = fields[name]
            fields[name] = hashlib.sha256(raw).hexdigest() if raw is not None else None
        blob = json.dumps(fields, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


def _bounded(name: str, value: float | None, low: float, high: float) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number.")
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low:g} and {high:g}.")


@dataclass(frozen=True)
class Submitted:
    job: Generation
    created: bool  # False: an idempotent replay of an earlier request


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
) -> Submitted:
    """Validate, charge and record a job, and defer its message until the commit.

    The cheap refusals (the request's bounds, a replay, the catalog, the balance and rate
    limit as read, the webhook URL's form) come before the expensive work (the webhook host's
    DNS lookup, decoding and fitting the images), so a refused caller costs little. Everything
    this writes, the job row, its stored inputs, the charge and the message, commits together
    or not at all: a replay or a refusal leaves no row, no file and no charge behind."""
    request.validate()
    fingerprint = request.fingerprint()
    if idempotency_key is not None:
        replay = _replay(session, user_id=user.id, key=idempotency_key, fingerprint=fingerprint)
        if replay is not None:
            return Submitted(job=replay, created=False)
    model, template = catalog.submit_choices(session, request.model_key, request.pose_template_id)
    check_model_access(model, user)
    # Quick refusals from what was read with the key; the charge below is what decides.
    credits.check_balance(user, model.credit_cost)
    check_rate_limit(session, user=user, settings=settings)
    webhook_url = (
        webhooks.check_url(request.webhook_url, allow_private=settings.webhook_allow_private)
        if request.webhook_url
        else None
    )
    image, pose = _fitted_images(request, settings, size=(model.width, model.height))
    job = _new_job(request, user=user, model=model, template=template, pose=pose is not None)
    job.webhook_url = webhook_url
    if idempotency_key is not None:
        winner = _record_with_key(
            session, job, key=idempotency_key, fingerprint=fingerprint, settings=settings
        )
        if winner is not None:
            return Submitted(job=winner, created=False)
    else:
        session.add(job)
        session.flush()
    inputs = {job.input_key: image.png}
    if pose is not None and job.pose_image_key is not None:
        inputs[job.pose_image_key] = pose.png
    _store_inputs(session, storage, inputs)
    # Last: the charge locks the user's balance row until the caller commits, so one user's
    # concurrent submits take turns here (nothing slow may come after it), and the rate
    # limit is counted again under that lock with this job in the window: exact under
    # concurrency.
    credits.charge(session, user_id=user.id, generation_id=job.id, amount=job.credit_cost)
    check_rate_limit(session, user=user, settings=settings, own=1)
    defer(session, generate_message(job, settings))
    return Submitted(job=job, created=True)


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
    pose: bool,
) -> Generation:
    """The job row a request stands for, with the model's defaults filled in."""
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
        params={
            "num_inference_steps": request.num_inference_steps or model.default_steps,
            "guidance_scale": (
                request.guidance_scale
                if request.guidance_scale is not None
                else model.guidance_scale
            ),
            "controlnet_conditioning_scale": request.controlnet_conditioning_scale,
            "strength": request.strength,
            "seed": request.seed if request.seed is not None else secrets.randbelow(2**32),
            "width": model.width,
            "height": model.height,
        },
        pose_source="template" if template else ("pose_image" if pose else "image"),
        pose_template_id=template.id if template else None,
        credit_cost=model.credit_cost,
        priority=model.priority,
        outputs=[],
        published_at=utcnow(),
    )
    job.input_key = f"inputs/{job.id}/image.png"
    job.pose_image_key = f"inputs/{job.id}/pose.png" if pose else None
    return job


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


def get_for_user(session: Session, *, job_id: str, user: User) -> Generation:
    job = _get(session, job_id)
    # Another user's job is indistinguishable from a missing one.
    if job is None or job.user_id != user.id:
        raise NotFound(f"No generation {job_id!r}.")
    return job


def _get(session: Session, job_id: str) -> Generation | None:
    return session.get(Generation, job_id) if catalog.is_uuid(job_id) else None


@dataclass(frozen=True)
class Page:
    items: list[Generation]
    next_cursor: str | None


def list_for_user(
    session: Session, *, user: User, status: str | None, limit: int, cursor: str | None
) -> Page:
    rows = list(session.scalars(list_statement(user.id, status=status, limit=limit, cursor=cursor)))
    next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return Page(items=rows[:limit], next_cursor=next_cursor)


def list_statement(
    user_id: str, *, status: str | None, limit: int, cursor: str | None
) -> Select[Generation]:
    """A user's jobs, newest first, one more than `limit` (to know whether a page follows)."""
    stmt = select(Generation).where(Generation.user_id == user_id)
    if status:
        statuses = [s.strip() for s in status.split(",") if s.strip()]
        unknown = set(statuses) - {"queued", "processing", *TERMINAL_STATUSES}
        if unknown:
            raise InvalidRequest(f"Unknown status {sorted(unknown)[0]!r}.")
        stmt = stmt.where(Generation.status.in_(statuses))
    if cursor:
        created_at, last_id = _decode_cursor(cursor)
        # The first condition is implied by the second; it is what starts the index scan at
        # the cursor (Postgres takes no bound from the OR, and read every newer job first).
        stmt = stmt.where(
            Generation.created_at <= created_at,
            or_(
                Generation.created_at < created_at,
                and_(Generation.created_at == created_at, Generation.id < last_id),
            ),
        )
    return stmt.order_by(Generation.created_at.desc(), Generation.id.desc()).limit(limit + 1)


def _encode_cursor(job: Generation) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, job_id = raw.partition("|")
        created_at = dt.datetime.fromisoformat(created)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("Invalid cursor.") from None
    if not catalog.is_uuid(job_id) or created_at.tzinfo is None:
        raise InvalidRequest("Invalid cursor.")
    return created_at, job_id


def cancel(session: Session, *, job_id: str, user: User) -> Generation:
    """Cancel the caller's job, refunded (`lifecycle.cancel`); AlreadyFinished if it ended."""
    job = get_for_user(session, job_id=job_id, user=user)
    if lifecycle.cancel(session, job_id=job.id) is None:
        raise AlreadyFinished(f"Generation {job.id} is {job.status} already.")
    return job


# The queue's run order as the index `ix_generations_queue` spells it (a literal 9, not a bound
# parameter, so the planner matches the indexed expression).
QUEUE_ORDER: tuple[Any, ...] = (literal_column("9 - generations.priority"), Generation.created_at)
# A position is counted up to POSITION_CAP (posegen.render) and reported as the cap beyond.
# Even the capped count reads POSITION_CAP index entries for a job deep in a long queue
# (0.4-0.7 ms of Postgres a poll at 100,000 queued: `python -m bench.scale`). So each process
# remembers, for a second, where the queue's POSITION_CAP-th job stands (the cut-off): a job
# behind it has POSITION_CAP or more ahead and is answered without counting. Jobs before it
# are counted exactly. A job the queue moved past the cut-off within the second still reads
# as capped until the next refresh.
CUTOFF_TTL = 1.0


def _count_ahead(order: Any, created_at: Any) -> Any:
    """SQL: how many queued jobs run before one at (order, created_at), read in run order
    through `ix_generations_queue` (the table itself, never an alias), up to POSITION_CAP in
    each of two parts (the caller caps the sum: `_capped`).

    The parts are the jobs of higher priority, then the older ones of the same priority.
    Each bounds its index scan where it must stop, so a job near the head reads as many
    entries as it has jobs ahead. A single row comparison, `(9 - priority, created_at) <
    (order, created_at)`, does not stop a Postgres 15 index scan at the job: it read the
    whole queue for a job near its head (7-44 ms a poll at 100,000 queued). Behind the cut-off
    (the `cutoff_order` and `cutoff_created_at` parameters, NULL when fewer than
    POSITION_CAP jobs are queued), POSITION_CAP without reading the queue."""
    queue_order = QUEUE_ORDER[0]
    queued = Generation.__table__

    def capped_count(*where: Any, order_by: Any) -> Any:
        # ORDER BY the index's order, so the planner never prefers scanning the table for
        # the first rows that match (with most rows queued, a LIMIT makes that look cheap).
        ahead = (
            select(literal_column("1"))
            .select_from(queued)
            .where(status_is(Generation.status, "queued"), *where)
            .correlate_except(queued)
            .order_by(*order_by)
            .limit(POSITION_CAP)
            .subquery()
        )
        return select(func.count()).select_from(ahead).scalar_subquery()

    counted = capped_count(queue_order < order, order_by=QUEUE_ORDER) + capped_count(
        queue_order == order, Generation.created_at < created_at, order_by=QUEUE_ORDER[1:]
    )
    cutoff = tuple_(
        bindparam("cutoff_order", type_=Integer),
        bindparam("cutoff_created_at", type_=Generation.__table__.c.created_at.type),
    )
    return case(
        (tuple_(order, created_at) > cutoff, literal_column(str(POSITION_CAP), Integer)),
        else_=counted,
    )


_AHEAD = select(
    _count_ahead(
        bindparam("order", type_=Integer),
        bindparam("created_at", type_=Generation.__table__.c.created_at.type),
    )
)

_CUTOFF = DriverQuery(
    select(literal_column("9 - generations.priority", Integer), Generation.created_at)
    .select_from(Generation.__table__)
    .where(status_is(Generation.status, "queued"))
    .order_by(*QUEUE_ORDER)
    .offset(POSITION_CAP - 1)
    .limit(1)
)
_CUTOFF_CACHE: dict[str, Any] = {}
_NO_CUTOFF = {"cutoff_order": None, "cutoff_created_at": None}


def _cached_cutoff() -> dict[str, Any] | None:
    """This process's cut-off parameters, or None when the caller is to read them afresh.
    Once they are CUTOFF_TTL old, the first caller to see it refreshes them and the callers
    meanwhile use the old ones."""
    params: dict[str, Any] | None = _CUTOFF_CACHE.get("params")
    if params is not None and time.monotonic() - _CUTOFF_CACHE["at"] >= CUTOFF_TTL:
        _CUTOFF_CACHE["at"] = time.monotonic()
        return None
    return params


def _remember_cutoff(row: Any) -> dict[str, Any]:
    params = _NO_CUTOFF if row is None else {"cutoff_order": row[0], "cutoff_created_at": row[1]}
    _CUTOFF_CACHE.update(at=time.monotonic(), params=params)
    return params


def queue_cutoff(db: Session | Connection) -> dict[str, Any]:
    """The cut-off parameters of `_count_ahead`, read again every CUTOFF_TTL seconds."""
    cached = _cached_cutoff()
    if cached is not None:
        return cached
    return _remember_cutoff(db.execute(_CUTOFF.statement).first())


async def _queue_cutoff_async(reads: AsyncReads) -> dict[str, Any]:
    """`queue_cutoff` for the poll, on the event loop."""
    cached = _cached_cutoff()
    if cached is not None:
        return cached
    return _remember_cutoff(await reads.first(_CUTOFF, {}))


def queue_position(session: Session, job: Generation) -> int | None:
    """How many queued jobs will start before this one (0: next), counted up to POSITION_CAP."""
    if job.status != "queued":
        return None
    params = {"order": 9 - job.priority, "created_at": job.created_at}
    return _capped(session.scalar(_AHEAD, params | queue_cutoff(session)))


def _capped(ahead: int | None) -> int:
    return min(int(ahead or 0), POSITION_CAP)


_RUN_SECONDS: dict[str, tuple[float, float | None]] = {}
RUN_SECONDS_TTL = 5.0


def recent_run_seconds(db: Session | Connection, model_key: str) -> float | None:
    """Median run time of the model's latest completed jobs, for the ETA. An estimate, so
    each process keeps it for a few seconds instead of asking on every poll, "no history yet"
    (None) included: a model whose first job is still running would otherwise cost every
    poll of its queue a second query."""
    cached = _RUN_SECONDS.get(model_key)
    if cached is not None and time.monotonic() - cached[0] < RUN_SECONDS_TTL:
        return cached[1]
    rows = db.execute(_RECENT_RUNS.statement, {"model_key": model_key}).all()
    return _remember_run_seconds(model_key, rows)


async def _recent_run_seconds_async(reads: AsyncReads, model_key: str) -> float | None:
    """`recent_run_seconds` for the poll, on the event loop."""
    cached = _RUN_SECONDS.get(model_key)
    if cached is not None and time.monotonic() - cached[0] < RUN_SECONDS_TTL:
        return cached[1]
    rows = await reads.all(_RECENT_RUNS, {"model_key": model_key})
    return _remember_run_seconds(model_key, rows)


RUN_TIME_SAMPLE = 20


def recent_runs(model_key: Any) -> Select[dt.datetime | None, dt.datetime | None]:
    """A model's latest completed jobs (ix_generations_model_finished)."""
    return (
        select(Generation.started_at, Generation.finished_at)
        .where(Generation.model_key == model_key, status_is(Generation.status, "completed"))
        .order_by(Generation.finished_at.desc())
        .limit(RUN_TIME_SAMPLE)
    )


_RECENT_RUNS = DriverQuery(recent_runs(bindparam("model_key")))


def _remember_run_seconds(model_key: str, rows: Any) -> float | None:
    durations = sorted(
        (finished - started).total_seconds() for started, finished in rows if started and finished
    )
    value = durations[len(durations) // 2] if durations else None
    _RUN_SECONDS[model_key] = (time.monotonic(), value)
    return value


def _poll_statement() -> Any:
    """Key, job and queue position in one statement, built once (building an expression this
    size costs more than running it). The job's columns are read as a plain row, not an ORM
    object: loading an entity costs more than the query on this hot path, and only the
    columns the job JSON shows. `job` aliases the jobs table; the position is
    `queue_position`'s count, NULL unless the job is queued."""
    job = Generation.__table__.alias("job")
    counted = _count_ahead(literal_column("9") - job.c.priority, job.c.created_at)
    position = case((job.c.status == "queued", counted), else_=None)
    return (
        select(
            ApiKey.revoked_at,
            position.label("queue_position"),
            *(job.c[name] for name in RENDERED_COLUMNS),
        )
        .select_from(ApiKey.__table__)
        .outerjoin(job, and_(job.c.id == bindparam("job_id"), job.c.user_id == ApiKey.user_id))
        .where(ApiKey.key_hash == bindparam("key_hash"))
    )


_POLL = DriverQuery(_poll_statement())


async def poll(reads: AsyncReads, *, authorization: str | None, job_id: str) -> dict[str, Any]:
    """A status poll in one round trip: the key, the caller's job and its queue position.
    Polls are the hottest route; auth, fetch and position as separate queries cost three.
    Awaited on the API's event loop (`AsyncReads`)."""
    key_hash = bearer_key_hash(authorization)
    # An id that is not a UUID matches no job; the key is still checked (401 before 404).
    params = {"job_id": job_id if catalog.is_uuid(job_id) else None, "key_hash": key_hash}
    params |= await _queue_cutoff_async(reads)
    row = live_key(await reads.first(_POLL, params))
    if row.id is None:  # another user's job is indistinguishable from a missing one
        raise NotFound(f"No generation {job_id!r}.")
    position = None if row.queue_position is None else _capped(row.queue_position)
    per_job = None
    if position is not None:
        per_job = await _recent_run_seconds_async(reads, row.model_key)
    return render_job(row, queue_position=position, eta_seconds=_eta(per_job, position))


def job_json(session: Session, job: Generation) -> dict[str, Any]:
    """The contract's job object (also the `data` of webhook events)."""
    return _with_eta(session, job, queue_position(session, job))


def _with_eta(db: Session | Connection, job: JobLike, position: int | None) -> dict[str, Any]:
    per_job = recent_run_seconds(db, job.model_key) if position is not None else None
    return render_job(job, queue_position=position, eta_seconds=_eta(per_job, position))


def _eta(per_job: float | None, position: int | None) -> float | None:
    """Seconds until a queued job finishes: the jobs ahead and itself, at the recent pace."""
    if per_job is None or position is None:
        return None
    return round(per_job * (position + 1), 3)


def output_key(session: Session, *, job_id: str, index: int, user: User) -> str:
    job = get_for_user(session, job_id=job_id, user=user)
    for out in [] if job.deleted_at else job.outputs:
        if out["index"] == index:
            return str(out["key"])
    raise NotFound(f"Generation {job_id} has no output {index}.")
