"""Webhooks: events recorded with the job's transition, one delivery row each, attempted in
their job's order and retried on a schedule swept by beat. The sending itself (signed, to a
checked address, endpoints isolated from one another) is `posegen.webhook_sender`; the URL
checks are `posegen.webhook_urls`.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, case, exists, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from db.models import Generation, User, WebhookDelivery, new_id, status_is
from db.types import utcnow
from posegen.errors import InvalidRequest
from posegen.queue import DELIVER_WEBHOOK_TASK, WEBHOOK_QUEUE, Message, defer
from posegen.render import render_job
from posegen.settings import Settings

TERMINAL_EVENTS = ("generation.completed", "generation.failed", "generation.canceled")
# What a caller may choose (`webhook_events`), in the order a job sends them; "completed"
# stands for every terminal event.
CHOICES = ("started", "progress", "completed")
DEFAULT_CHOICE = "completed"
PROGRESS = "generation.progress"


# -- the events a job's webhook takes ----------------------------------------------------------


def parse_choices(value: str | None) -> str | None:
    """`webhook_events` as stored: the chosen events in their order, None for the default."""
    if value is None or not value.strip():
        return None
    chosen = {part.strip() for part in value.split(",") if part.strip()}
    unknown = chosen - set(CHOICES)
    if unknown:
        raise InvalidRequest(
            f"Unknown webhook event {sorted(unknown)[0]!r}; choose from {', '.join(CHOICES)}."
        )
    normalised = ",".join(choice for choice in CHOICES if choice in chosen)
    return None if normalised == DEFAULT_CHOICE else normalised


def choices(job: Generation) -> list[str]:
    return (job.webhook_events or DEFAULT_CHOICE).split(",")


def takes(job: Generation, event_type: str) -> bool:
    """Whether the job's webhook takes this event."""
    if not job.webhook_url:
        return False
    kind = event_type.removeprefix("generation.")
    return ("completed" if event_type in TERMINAL_EVENTS else kind) in choices(job)


# -- recording and delivery -------------------------------------------------------------------


def record_event(
    session: Session,
    *,
    job: Generation,
    event_type: str,
    data: dict[str, Any] | None = None,
    seq: int = 0,
) -> WebhookDelivery | None:
    """Record the event for delivery (once per job, type and `seq`: a progress event's step)
    and defer its first attempt; `data` is the job as rendered for the event (rendered here
    when None). Events the job's webhook does not take are not recorded. A progress event
    still waiting for its first attempt is skipped: this later event says more."""
    if not takes(job, event_type):
        return None
    body = {
        "type": event_type,
        "timestamp": utcnow().isoformat().replace("+00:00", "Z"),
        "data": render_job(job) if data is None else data,
    }
    delivery = WebhookDelivery(
        id=new_id(),
        generation_id=job.id,
        user_id=job.user_id,
        event_type=event_type,
        seq=seq,
        url=job.webhook_url,
        payload=json.dumps(body, separators=(",", ":")),
        status="pending",
        attempts=0,
        attempt_log=[],
        next_attempt_at=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(delivery)
            session.flush()
    except IntegrityError:
        return None  # recorded already by an earlier run of the same transition
    _skip_unsent_progress(session, generation_id=job.id, but=delivery.id)
    defer(session, deliver_message(delivery.id))
    return delivery


def _skip_unsent_progress(session: Session, *, generation_id: str, but: str) -> None:
    """Progress deliveries of the job never attempted and not held by an attempt now: a
    slow endpoint gets the latest progress, not a backlog of old steps ahead of the end."""
    now = utcnow()
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.generation_id == generation_id,
            WebhookDelivery.event_type == PROGRESS,
            WebhookDelivery.status == "pending",
            WebhookDelivery.attempts == 0,
            WebhookDelivery.next_attempt_at <= now,
            WebhookDelivery.id != but,
        )
        .values(status="skipped", finished_at=now, next_attempt_at=None),
        execution_options={"synchronize_session": False},
    )


def _place(delivery: Any) -> Any:
    """A delivery's place among its job's events: started, progress, then the end (each
    job has one terminal event; its clock may be another machine's), by time within a kind."""
    kind = case(
        (delivery.event_type == "generation.started", 0), (delivery.event_type == PROGRESS, 1),
        else_=2,
    )  # fmt: skip
    return tuple_(kind, delivery.created_at, delivery.seq)


_EARLIER = aliased(WebhookDelivery)
# An earlier delivery of the same job is still pending: this one waits for it.
_WAITS = exists().where(
    _EARLIER.generation_id == WebhookDelivery.generation_id,
    _EARLIER.status == "pending",
    _place(_EARLIER) < _place(WebhookDelivery),
)


def deliver_message(delivery_id: str) -> Message:
    return Message(task=DELIVER_WEBHOOK_TASK, args=(delivery_id,), queue=WEBHOOK_QUEUE)


@dataclass(frozen=True)
class Attempt:
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @classmethod
    def raised(cls, exc: Exception, *, started: float) -> Attempt:
        """A failed attempt for an exception, `started` being its time.monotonic()."""
        error = f"{type(exc).__name__}: {exc}"
        return cls(status_code=None, error=error, duration_ms=elapsed_ms(started))


def due_url(session: Session, *, delivery_id: str) -> str | None:
    """Where a delivery goes, if it is pending and due (a cheap look before it waits for its
    endpoint; `claim_delivery` decides)."""
    row = session.execute(
        select(WebhookDelivery.url).where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= utcnow(),
        )
    ).first()
    return None if row is None else str(row.url)


def postpone(session: Session, *, delivery_id: str, seconds: float) -> None:
    """Leave a pending delivery for `seconds` without an attempt (its endpoint is paused)."""
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending")
        .values(next_attempt_at=utcnow() + dt.timedelta(seconds=seconds)),
        execution_options={"synchronize_session": False},
    )


def claim_delivery(session: Session, *, delivery_id: str, settings: Settings) -> bool:
    """Take a due delivery for one attempt; a second worker or a duplicate message gets False."""
    now = utcnow()
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= now,
            ~_WAITS,
        )
        # Hold it for the attempt's deadline (and some): a crash mid-attempt retries later.
        .values(next_attempt_at=now + dt.timedelta(seconds=settings.webhook_timeout * 3))
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Outgoing:
    url: str
    msg_id: str
    secret: str
    body: bytes


def outgoing(session: Session, *, delivery_id: str) -> Outgoing:
    delivery = session.get_one(WebhookDelivery, delivery_id)
    user = session.get_one(User, delivery.user_id)
    return Outgoing(
        url=delivery.url,
        msg_id=delivery.id,
        secret=user.webhook_secret,
        body=delivery.payload.encode(),
    )


def record_attempt(
    session: Session, *, delivery_id: str, attempt: Attempt, settings: Settings
) -> WebhookDelivery:
    delivery = session.get_one(WebhookDelivery, delivery_id)
    now = utcnow()
    delivery.attempts += 1
    delivery.attempt_log = [
        *delivery.attempt_log,
        {
            "at": now.isoformat(),
            "status_code": attempt.status_code,
            "error": _printable(attempt.error),
            "duration_ms": attempt.duration_ms,
        },
    ]
    schedule = settings.webhook_retry_schedule
    if attempt.ok:
        delivery.status, delivery.finished_at, delivery.next_attempt_at = "delivered", now, None
    elif attempt.status_code == 410 or delivery.attempts > len(schedule):
        # 410 Gone: the receiver says stop. Otherwise the schedule is spent.
        delivery.status, delivery.finished_at, delivery.next_attempt_at = "failed", now, None
    else:
        delay = schedule[delivery.attempts - 1]
        delivery.next_attempt_at = now + dt.timedelta(seconds=delay)
    session.flush()
    if delivery.status != "pending":
        _send_next(session, generation_id=delivery.generation_id)
    return delivery


def _send_next(session: Session, *, generation_id: str) -> None:
    """The job's next delivery, waiting for the one that just ended, is sent now (not at the
    next sweep)."""
    following = session.scalar(
        select(WebhookDelivery.id)
        .where(
            WebhookDelivery.generation_id == generation_id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= utcnow(),
            ~_WAITS,
        )
        .limit(1)
    )
    if following is not None:
        defer(session, deliver_message(following))


def due_query(now: dt.datetime, limit: int) -> Select[str]:
    """Pending deliveries whose next attempt is due, oldest first (ix_webhook_deliveries_due)."""
    return (
        select(WebhookDelivery.id)
        .where(status_is(WebhookDelivery.status, "pending"), WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    )


def due_deliveries(session: Session, *, limit: int = 500) -> list[str]:
    return list(session.scalars(due_query(utcnow(), limit)))


def _printable(error: str | None) -> str | None:
    """An error as the log can hold it: Postgres JSON refuses NUL, and a client shows escapes
    better than raw control characters (an exception may quote the URL it choked on)."""
    if error is None:
        return None
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in error)[:500]


def elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def deliveries_for(session: Session, generation_id: str) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.generation_id == generation_id)
    )
    return [
        {"id": d.id, "event_type": d.event_type, "status": d.status, "attempts": d.attempt_log}
        for d in rows
    ]
