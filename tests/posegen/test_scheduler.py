"""The scheduler's order on real Postgres (and SQLite, the demo's database): fair turns within
a priority, priority first, the models a worker serves, affinity, deadlines, and a queue
position that says how many jobs start first."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Sequence

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import AiModel, CreditLedger, Generation, QueueTurn, UserTurn
from db.types import utcnow
from posegen import accounts, credits, lifecycle, reconciler, scheduler
from posegen.jobs import queries
from posegen.settings import Settings
from tests.posegen.conftest import job_row

SETTINGS = Settings(affinity_max_wait=30)


def model(s: Session, key: str = "tiny-sd15-openpose") -> AiModel:
    return s.scalars(select(AiModel).where(AiModel.model_key == key)).one()


def queue(
    s: Session,
    user_id: str,
    n: int = 1,
    *,
    key: str = "tiny-sd15-openpose",
    age_s: float = 0.0,
    deadline_in_s: float | None = None,
    priority: int | None = None,
) -> list[str]:
    """`n` queued jobs of a user, as a submit records them (the job, then its turn), one a
    millisecond apart, the first `age_s` old: their ids, oldest first."""
    m, ids = model(s, key), []
    priority = m.priority if priority is None else priority
    for i in range(n):
        created = utcnow() - dt.timedelta(seconds=age_s) + dt.timedelta(milliseconds=i)
        row = job_row(m, user_id, created_at=created, priority=priority)
        if deadline_in_s is not None:
            row["deadline_at"] = utcnow() + dt.timedelta(seconds=deadline_in_s)
        s.add(Generation(**row))
        s.flush()
        credits.charge(s, user_id=user_id, generation_id=row["id"], amount=row["credit_cost"])
        scheduler.joined(s, user_id=user_id, model_id=m.id, priority=priority, since=created)
        ids.append(row["id"])
    s.commit()
    return ids


def user(s: Session, name: str) -> str:
    return accounts.create_user(s, email=f"{name}@example.com", credits=100).id


def claim_all(s: Session, models: Sequence[str], *, warm: Sequence[str] = ()) -> list[str]:
    """Claim until nothing is left, one claim a transaction, as workers do: the job ids in
    the order they started."""
    started = []
    while (c := lifecycle.claim_next(
        s, worker_id="w", models=models, warm=warm, lease_seconds=60, settings=SETTINGS
    )) is not None:  # fmt: skip
        started.append(c.job.id)
        s.commit()
    s.commit()
    return started


def test_users_take_turns_and_each_keeps_its_own_order(any_session: Session) -> None:
    s = any_session
    heavy, light = user(s, "heavy"), user(s, "light")
    heavies = queue(s, heavy, 6, age_s=10)
    lights = queue(s, light, 2, age_s=5)
    order = claim_all(s, [model(s).id])
    # Neither has started a job: the oldest queued job first (heavy), then light, whose turn
    # is now the oldest; then turns alternate until light has none left.
    assert order == [heavies[0], lights[0], heavies[1], lights[1], *heavies[2:]]


def test_the_user_whose_last_job_started_longest_ago_goes_first(any_session: Session) -> None:
    s = any_session
    early, late, never = user(s, "early"), user(s, "late"), user(s, "never")
    (first,) = queue(s, early, age_s=30)
    (second,) = queue(s, late, age_s=29)
    assert claim_all(s, [model(s).id]) == [first, second]
    # Queued later, in the opposite order: the one never started first, then the user
    # whose last start is the oldest, although their job is the youngest.
    (b,) = queue(s, late, age_s=3)
    (a,) = queue(s, early, age_s=2)
    (n,) = queue(s, never, age_s=1)
    assert claim_all(s, [model(s).id]) == [n, a, b]


def test_a_higher_priority_runs_first_whoever_waits(any_session: Session) -> None:
    s = any_session
    low_user, high_user = user(s, "low"), user(s, "high")
    lows = queue(s, low_user, 2, key="tiny-sdxl-openpose", age_s=60, priority=5)
    highs = queue(s, high_user, 2, age_s=1, priority=8)  # a model of a higher priority
    assert claim_all(s, [model(s).id, model(s, "tiny-sdxl-openpose").id]) == highs + lows


def test_a_worker_claims_only_the_models_it_serves(any_session: Session) -> None:
    s = any_session
    u = user(s, "both")
    xl = queue(s, u, 2, key="tiny-sdxl-openpose", age_s=60)
    sd = queue(s, u, 1, age_s=1)
    assert claim_all(s, [model(s).id]) == sd
    assert s.get(Generation, xl[0]).status == "queued"  # type: ignore[union-attr]
    assert claim_all(s, [model(s, "tiny-sdxl-openpose").id]) == xl


def test_a_warm_model_is_preferred_until_another_waits_too_long(any_session: Session) -> None:
    s = any_session
    u, v = user(s, "u"), user(s, "v")
    sd, xl = model(s).id, model(s, "tiny-sdxl-openpose").id
    cold = queue(s, u, 1, key="tiny-sdxl-openpose", age_s=10)  # older, but its model is cold
    warm = queue(s, v, 2, age_s=5)
    assert claim_all(s, [sd, xl], warm=[sd]) == [*warm, *cold]
    # Past POSEGEN_AFFINITY_MAX_WAIT the turns decide again, warm model or not: two users who
    # never started, the older job first.
    x, y = user(s, "x"), user(s, "y")
    overdue = queue(s, x, 1, key="tiny-sdxl-openpose", age_s=SETTINGS.affinity_max_wait + 5)
    fresh = queue(s, y, 1, age_s=1)
    assert claim_all(s, [sd, xl], warm=[sd]) == [*overdue, *fresh]


def test_position_is_the_number_of_jobs_that_start_first(any_session: Session) -> None:
    s = any_session
    a, b, c = user(s, "a"), user(s, "b"), user(s, "c")
    queue(s, a, 5, age_s=50)
    queue(s, b, 2, age_s=40)
    queue(s, c, 3, age_s=30)
    queue(s, b, 2, age_s=20)
    queue(s, a, 1, key="tiny-sdxl-openpose", age_s=10)  # same priority, another model
    jobs = s.scalars(select(Generation).where(Generation.status == "queued")).all()
    positions = {job.id: queries.queue_position(s, job) for job in jobs}
    s.commit()
    order = claim_all(s, [model(s).id, model(s, "tiny-sdxl-openpose").id])
    assert {job_id: order.index(job_id) for job_id in order} == positions


def test_a_job_past_its_deadline_never_runs_and_is_refunded(any_session: Session) -> None:
    s = any_session
    u = user(s, "late")
    (expired,) = queue(s, u, age_s=5, deadline_in_s=-1)
    (on_time,) = queue(s, u, age_s=1, deadline_in_s=3600)
    assert claim_all(s, [model(s).id]) == [on_time]
    sweep = reconciler.reconcile(s, settings=SETTINGS)
    s.commit()
    assert sweep.failed == 1
    job = s.get_one(Generation, expired, populate_existing=True)
    assert (job.status, job.error_code, job.started_at) == ("failed", "deadline_exceeded", None)
    kinds = s.scalars(select(CreditLedger.kind).where(CreditLedger.generation_id == expired)).all()
    assert sorted(kinds) == ["charge", "refund"]
    assert credits.ledger_sum(s, user_id=u) == 100 - 1  # only the job that ran is paid for
    turn = s.get_one(QueueTurn, (u, model(s).id), populate_existing=True)
    assert turn.queued == 0


def test_turns_follow_every_transition_and_a_drifted_one_is_repaired(
    any_session: Session,
) -> None:
    s = any_session
    u = user(s, "counted")
    m = model(s).id
    ids = queue(s, u, 4)

    def counted() -> int:
        return s.get_one(QueueTurn, (u, m), populate_existing=True).queued

    assert counted() == 4
    lifecycle.cancel(s, job_id=ids[0])
    lifecycle.fail(s, job_id=ids[1], code="internal_error", message="x")
    claim = lifecycle.claim(s, job_id=ids[2], worker_id="w", lease_seconds=60)
    assert claim is not None
    s.commit()
    assert counted() == 1
    assert lifecycle.release(s, job_id=ids[2], worker_id="w", settings=SETTINGS) is not None
    s.commit()
    assert counted() == 2
    # A count that drifted (a bug, a manual edit) is found and repaired by the reconciler.
    s.get_one(QueueTurn, (u, m)).queued = 0
    s.commit()
    assert scheduler.drifted(s) == [(u, m)]
    assert reconciler.reconcile(s, settings=SETTINGS).repaired == 1
    s.commit()
    assert counted() == 2 and scheduler.drifted(s) == []
    # A turn missing altogether (jobs recorded past the scheduler) is made again, and its
    # jobs are claimed.
    s.delete(s.get_one(QueueTurn, (u, m)))
    s.commit()
    assert claim_all(s, [m]) == []
    assert reconciler.reconcile(s, settings=SETTINGS).repaired == 1
    s.commit()
    assert counted() == 2
    assert sorted(claim_all(s, [m])) == sorted([ids[2], ids[3]])


@pytest.mark.parametrize("tier_limits", ["3", "free=3"])
def test_the_queue_limit_per_tier_parses(tier_limits: str) -> None:
    limits = Settings(max_queued_per_user=tier_limits).max_queued_per_user  # type: ignore[arg-type]
    assert limits["free"] == 3
    assert limits["pro"] == (3 if "=" not in tier_limits else 200)


def test_a_claim_that_finds_the_turns_held_still_sees_the_job_waiting(
    session: Session, sessions
) -> None:
    """Two claimers at once for one user's two jobs: the second skips the turn the first
    holds and claims nothing, but `claimable` tells its worker to keep the job's message."""
    s = session
    u = user(s, "busy")
    queue(s, u, 2)
    queue(s, u, 1, key="tiny-sdxl-openpose", deadline_in_s=-1)
    sd, xl = model(s).id, model(s, "tiny-sdxl-openpose").id
    first = lifecycle.claim_next(
        s, worker_id="a", models=[sd], lease_seconds=60, settings=SETTINGS
    )  # uncommitted: the turn stays locked
    assert first is not None
    with sessions() as other:
        assert (
            lifecycle.claim_next(
                other, worker_id="b", models=[sd], lease_seconds=60, settings=SETTINGS
            )
            is None
        )
        assert scheduler.claimable(other, model_id=sd)
        # A model whose only queued job is past its deadline has nothing to keep a message for.
        assert not scheduler.claimable(other, model_id=xl)
        other.rollback()
    s.rollback()


def test_a_warm_model_does_not_jump_a_higher_priority(any_session: Session) -> None:
    s = any_session
    u, v = user(s, "warm-low"), user(s, "cold-high")
    sd, xl = model(s).id, model(s, "tiny-sdxl-openpose").id
    low = queue(s, u, 1, age_s=5, priority=1)
    high = queue(s, v, 1, key="tiny-sdxl-openpose", age_s=1, priority=9)
    assert claim_all(s, [sd, xl], warm=[sd]) == [*high, *low]


def test_a_turn_whose_head_cannot_start_does_not_stop_the_claim(any_session: Session) -> None:
    """The first turn in order has only a job past its deadline: the claim goes on to the next
    turn's job (on Postgres, past the single statement's pick to the turns one by one)."""
    s = any_session
    stuck, other = user(s, "stuck"), user(s, "other")
    (expired,) = queue(s, stuck, age_s=10, deadline_in_s=-1)
    (waiting,) = queue(s, other, age_s=1)
    claim = lifecycle.claim_next(
        s, worker_id="w", models=[model(s).id], lease_seconds=60, settings=SETTINGS
    )
    assert claim is not None and claim.job.id == waiting
    s.commit()
    assert s.get_one(Generation, expired, populate_existing=True).status == "queued"
    assert s.get_one(QueueTurn, (other, model(s).id), populate_existing=True).queued == 0
    assert s.get_one(QueueTurn, (stuck, model(s).id), populate_existing=True).queued == 1


def test_parallel_claimers_take_each_job_once_and_keep_the_turns(
    session: Session, sessions
) -> None:
    """Eight claimers at once, each claim its own transaction, while a ninth thread cancels
    some of the queued jobs: every job ends claimed once or canceled, never both; each turn
    counts nothing left; each user's latest start is recorded, on every turn of theirs."""
    s = session
    users = [user(s, f"racer{i}") for i in range(12)]
    sd, xl = model(s).id, model(s, "tiny-sdxl-openpose").id
    jobs = [j for u in users for j in queue(s, u, 8)]
    jobs += queue(s, users[0], 4, key="tiny-sdxl-openpose")  # a second turn of one user
    to_cancel = jobs[5::9]
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer(n: int) -> None:
        with sessions() as own:
            while (c := lifecycle.claim_next(
                own, worker_id=f"w{n}", models=[sd, xl], lease_seconds=60, settings=SETTINGS
            )) is not None:  # fmt: skip
                own.commit()
                with lock:
                    claimed.append(c.job.id)

    def canceler() -> None:
        with sessions() as own:
            for job_id in to_cancel:
                lifecycle.cancel(own, job_id=job_id)
                own.commit()

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
    threads.append(threading.Thread(target=canceler))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = dict(s.execute(select(Generation.id, Generation.status)).tuples().all())
    attempts = set(s.scalars(select(Generation.attempts).where(Generation.id.in_(claimed))))
    assert len(claimed) == len(set(claimed)) and attempts == {1}
    # A cancel also stops a job already claimed: canceled ones are among those asked for.
    assert {j for j, st in rows.items() if st == "processing"} == set(claimed) - set(to_cancel)
    assert {j for j, st in rows.items() if st == "canceled"} == set(to_cancel)
    assert set(claimed) | set(to_cancel) == set(jobs)
    turns = s.execute(select(QueueTurn.queued)).scalars().all()
    assert turns and set(turns) == {0}
    starts = s.execute(select(UserTurn.user_id, UserTurn.last_started_at)).tuples().all()
    assert len(starts) == len(users)
    latest = {u: at for u, at in starts}
    started = s.execute(
        select(Generation.user_id, func.max(Generation.started_at)).group_by(Generation.user_id)
    ).tuples()
    assert {u: at for u, at in started} == latest
