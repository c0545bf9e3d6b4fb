"""The reconciler's lost-message sweep, on Postgres and on SQLite (demo).

A job whose message the broker lost is published again; a backlog whose messages are all
waiting on the broker is not, however long it has waited (tests/api/test_lost_messages.py
runs the same against Redis)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import update
from sqlalchemy.orm import Session

from db.models import Generation
from db.types import utcnow
from posegen import accounts, reconciler
from posegen.settings import Settings
from tests.factories import strand
from tests.posegen.conftest import make_job


def backlog(s: Session, n: int, *, waited_s: float) -> list[str]:
    """`n` queued jobs, published `waited_s` ago, in run order (oldest first): their ids."""
    user = accounts.create_user(s, email="backlog@example.com", credits=10)
    ids = [make_job(s, user.id, age_s=waited_s + n - i) for i in range(n)]
    published = utcnow() - dt.timedelta(seconds=waited_s)
    s.execute(update(Generation).values(published_at=published))
    s.commit()
    return ids


def sweep(s: Session, settings: Settings, waiting: int | None) -> list[str]:
    """One sweep with the broker holding `waiting` messages: the jobs it published again."""
    result = reconciler.reconcile(s, settings=settings, count_waiting=lambda queue: waiting)
    sent = [m.args[0] for m in s.info.pop("outbox", [])]
    s.commit()
    assert result.republished == len(sent)
    return sent


def test_a_backlog_whose_messages_wait_on_the_broker_is_not_published_again(
    any_session: Session, settings: Settings
) -> None:
    s = any_session
    backlog(s, 3, waited_s=3600)
    assert sweep(s, settings, waiting=3) == []
    assert sweep(s, settings, waiting=7) == []  # messages of canceled jobs count too


def test_as_many_jobs_as_messages_are_missing_are_published_again_in_run_order(
    any_session: Session, settings: Settings
) -> None:
    s = any_session
    ids = backlog(s, 3, waited_s=3600)
    assert sweep(s, settings, waiting=1) == ids[:2]
    # Published again just now: the next sweep finds the broker holding their messages.
    assert sweep(s, settings, waiting=3) == []


def test_a_missing_message_is_not_published_again_before_the_requeue_age(
    any_session: Session, settings: Settings
) -> None:
    """A job just committed may not be published yet: the requeue age still applies."""
    s = any_session
    backlog(s, 2, waited_s=settings.requeue_after_seconds / 4)
    assert sweep(s, settings, waiting=0) == []


def test_where_the_broker_cannot_count_every_job_past_the_requeue_age_is_published(
    any_session: Session, settings: Settings
) -> None:
    s = any_session
    ids = backlog(s, 3, waited_s=3600)
    assert sweep(s, settings, waiting=None) == ids


def test_a_broker_that_cannot_be_counted_skips_republishing_but_not_the_leases(
    any_session: Session, settings: Settings
) -> None:
    """Redis down during a sweep: nothing is published again (it could not be sent), and
    the jobs whose worker died still go back to the queue."""
    s = any_session
    _, running = backlog(s, 2, waited_s=3600)
    strand(s, running, attempts=1, lease_expired_s=60)
    s.commit()

    def unreachable(queue: str) -> int:
        raise ConnectionError("Redis is down")

    result = reconciler.reconcile(s, settings=settings, count_waiting=unreachable)
    sent = [m.args[0] for m in s.info.pop("outbox", [])]
    s.commit()
    assert (result.republished, result.requeued) == (0, 1)
    assert sent == [running]
    assert s.get(Generation, running).status == "queued"
