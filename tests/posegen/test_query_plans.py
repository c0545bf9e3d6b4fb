"""The hot queries keep their indexes once Postgres runs them as prepared statements.

The drivers run statements prepared (psycopg after a statement's fifth run, asyncpg from the
first); Postgres may then plan one without its parameter values. A partial index (`WHERE status = 'queued'`) matches only a status it can
see while planning, so these queries write their status into the SQL (`status_is`). Each
test asks Postgres for the generic plan of the statement as the code builds it, with
sequential scans priced out, so a query that cannot use its index shows up as a Seq Scan.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select, text
from sqlalchemy.orm import Session

from api import poll
from db.models import Generation
from db.plans import generic_plan
from posegen import accounts, lifecycle, ratelimit, reconciler, scheduler, webhooks
from posegen.jobs import queries

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
ANY_ID = "00000000-0000-4000-8000-000000000000"


# The queue's count may read either partial index on a near-empty table (the queue order
# index at size: see `python -m bench.scale`); both need the status at planning time.
QUEUE = ("ix_generations_queue", "ix_generations_active")
HOT = {
    "poll": (poll.POLL.statement, {"job_id": ANY_ID, "key_hash": "x"}, ("pk_generations",)),
    "queue position": (
        scheduler.POSITION,
        {"user_id": ANY_ID, "model_id": ANY_ID, "created_at": NOW},
        ("ix_generations_turn",),
    ),
    "claim: next turn": (
        scheduler.turn_order([ANY_ID], []),
        {},
        ("ix_queue_turns_next", "ix_queue_turns_model"),
    ),
    "claim: the turn's head": (
        scheduler.TURN_HEAD,
        {"turn_user": ANY_ID, "turn_model": ANY_ID, "now": NOW},
        ("ix_generations_turn",),
    ),
    "past deadline": (reconciler.past_deadline(NOW, 1000), {}, ("ix_generations_deadline",)),
    "eta": (queries.recent_runs("tiny-sd15-openpose"), {}, ("ix_generations_model_finished",)),
    "list": (
        queries.list_statement(ANY_ID, status=None, limit=20, cursor=None),
        {},
        ("ix_generations_user_created",),
    ),
    "list, next page of one status": (
        queries.list_statement(
            ANY_ID,
            status="completed",
            limit=20,
            cursor=queries.encode_cursor(Generation(id=ANY_ID, created_at=NOW)),
        ),
        {},
        ("ix_generations_user_created",),
    ),
    "rate limit": (
        ratelimit.BLOCKING_JOB,
        ratelimit.blocking_params(ANY_ID, 3000),
        ("ix_generations_user_created",),
    ),
    "stale queued": (reconciler.stale_queued(NOW, 1000, "tiny-sd15-openpose"), {}, QUEUE),
    "queued by model": (
        reconciler.queued_by_model(),
        {},
        (*QUEUE, "ix_generations_turn"),
    ),
    "expired leases": (reconciler.expired_leases(NOW, 1000), {}, ("ix_generations_active",)),
    "due webhooks": (webhooks.due_query(NOW, 500), {}, ("ix_webhook_deliveries_due",)),
}


@pytest.mark.parametrize("name", HOT)
def test_generic_plan_uses_the_partial_index(conn: Connection, name: str) -> None:
    statement, params, indexes = HOT[name]
    plan = "\n".join(generic_plan(conn, statement, params))
    assert any(index in plan for index in indexes), plan
    assert "Seq Scan" not in plan, plan


def test_the_claim_in_one_statement_reads_its_indexes(conn: Connection) -> None:
    """The claim's single statement: the first turn from the turns' order index, that turn's
    head from ix_generations_turn (not a join that scans the queue), the job by its key, the
    user's turns by theirs."""
    params = {"models": [ANY_ID], "now": NOW, "worker": "w", "lease_until": NOW}
    plan = "\n".join(generic_plan(conn, lifecycle._CLAIM_NEXT, params))
    # Either of the turns' partial indexes, as for "claim: next turn" (on an empty table the
    # model's; the order's at size: bench.scheduler).
    assert "ix_queue_turns_next" in plan or "ix_queue_turns_model" in plan, plan
    for index in ("ix_generations_turn", "pk_generations", "pk_queue_turns"):
        assert index in plan, plan
    assert "Seq Scan" not in plan, plan


def test_a_bound_status_loses_the_index(conn: Connection) -> None:
    """The check has teeth: the same query with its status as a parameter scans the table."""
    bound: Any = select(Generation.id).where(Generation.status == "queued").limit(10)
    plan = "\n".join(generic_plan(conn, bound, {}))
    assert "Seq Scan on generations" in plan and "ix_generations" not in plan, plan


def _bulk_jobs(engine: Engine, n: int, *, status: str) -> str:
    """A user with `n` jobs, one a second back from now, and fresh statistics: the user's id."""
    with Session(engine) as s:
        user = accounts.create_user(s, email="bulk@example.com").id
        s.commit()
    with engine.begin() as c:
        model = c.execute(
            text("SELECT id FROM ai_models WHERE model_key = 'tiny-sd15-openpose'")
        ).scalar_one()
        c.execute(
            text(
                "INSERT INTO generations (id, user_id, model_id, model_key, status, prompt,"
                " negative_prompt, params, pose_source, input_key, credit_cost, priority,"
                " progress_step, progress_total, outputs, attempts, created_at)"
                " SELECT gen_random_uuid(), :user, :model, 'tiny-sd15-openpose', :status, 'p',"
                " '', '{}', 'image', 'inputs/x.png', 1, 5, 0, 0, '[]', 0,"
                " now() - make_interval(secs => g) FROM generate_series(1, :n) AS g"
            ),
            {"user": user, "model": model, "status": status, "n": n},
        )
        # Their turns, as submits keep them (the bulk insert goes around the submit).
        c.execute(
            text(
                "INSERT INTO queue_turns (user_id, model_id, priority, queued, waiting_since,"
                " last_started_at) SELECT user_id, model_id, 5, count(*), min(created_at),"
                " '1970-01-01+00' FROM generations WHERE status = 'queued'"
                " GROUP BY user_id, model_id"
            )
        )
        c.execute(text("ANALYZE generations"))
    return user


def _pages_read(c: Connection, statement: Any, params: dict[str, Any]) -> tuple[int, str]:
    """The pages a statement's generic plan read (hit or read), and the plan."""
    plan = generic_plan(c, statement, params, buffers=True)
    c.rollback()
    root = next(line for line in plan if "Buffers:" in line)  # the whole execution's pages
    return sum(int(n) for n in re.findall(r"(?:hit|read)=(\d+)", root)), "\n".join(plan)


def test_counting_a_job_near_the_head_reads_only_the_head(db_engine: Engine) -> None:
    """The position count stops at the counted job: a job fourth in a queue of 20,000 reads a
    few pages, not the queue's index (a single row comparison did not stop the scan)."""
    user = _bulk_jobs(db_engine, 20000, status="queued")
    with db_engine.connect() as c:
        fourth = c.execute(
            text("SELECT created_at FROM generations ORDER BY created_at OFFSET 3 LIMIT 1")
        ).scalar_one()
        model = c.execute(text("SELECT model_id FROM generations LIMIT 1")).scalar_one()
        params = {"user_id": user, "model_id": model, "created_at": fourth}
        assert c.execute(scheduler.POSITION, params).scalar_one() == 3
        pages, plan = _pages_read(c, scheduler.POSITION, params)
    assert pages < 20, plan


def test_a_deep_page_of_the_list_starts_at_its_cursor(db_engine: Engine) -> None:
    """Keyset pagination: the next page's index scan starts at the cursor, so a page deep in
    a long history reads a few pages, not every newer job."""
    user = _bulk_jobs(db_engine, 20000, status="completed")
    with db_engine.connect() as c:
        deep = c.execute(
            select(Generation.id, Generation.created_at)
            .order_by(Generation.created_at.desc())
            .offset(19990)
            .limit(1)
        ).one()
        cursor = queries.encode_cursor(Generation(id=deep.id, created_at=deep.created_at))
        statement = queries.list_statement(user, status=None, limit=20, cursor=cursor)
        assert len(c.execute(statement).all()) == 9
        pages, plan = _pages_read(c, statement, {})
    assert pages < 40, plan


def test_a_position_reads_its_own_users_jobs_not_another_users_backlog(
    db_engine: Engine,
) -> None:
    """A light user's job behind a heavy user's 20,000: its position counts the heavy user's
    jobs from their turn row, and its own older jobs from its own index entries."""
    _bulk_jobs(db_engine, 20000, status="queued")
    with Session(db_engine) as s:
        light = accounts.create_user(s, email="light@example.com").id
        s.commit()
    with db_engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO generations (id, user_id, model_id, model_key, status, prompt,"
                " negative_prompt, params, pose_source, input_key, credit_cost, priority,"
                " progress_step, progress_total, outputs, attempts, created_at)"
                " SELECT gen_random_uuid(), :user, model_id, model_key, 'queued', 'p', '', '{}',"
                " 'image', 'inputs/x.png', 1, 5, 0, 0, '[]', 0, now() FROM generations LIMIT 1"
            ),
            {"user": light},
        )
        c.execute(
            text(
                "INSERT INTO queue_turns (user_id, model_id, priority, queued, waiting_since,"
                " last_started_at) SELECT user_id, model_id, 5, 1, created_at, '1970-01-01+00'"
                " FROM generations WHERE user_id = :user"
            ),
            {"user": light},
        )
        created = c.execute(
            text("SELECT created_at FROM generations WHERE user_id = :u"), {"u": light}
        ).scalar_one()
    with db_engine.connect() as c:
        model = c.execute(text("SELECT model_id FROM generations LIMIT 1")).scalar_one()
        params = {"user_id": light, "model_id": model, "created_at": created}
        # Neither user started a job, and the heavy user's turn waited first: one heavy job,
        # then this one.
        assert c.execute(scheduler.POSITION, params).scalar_one() == 1
        pages, plan = _pages_read(c, scheduler.POSITION, params)
    assert pages < 30, plan
