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
from posegen import accounts, ratelimit, reconciler, scheduler, webhooks
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
        {"user_id": ANY_ID, "priority": 5, "created_at": NOW},
        ("ix_generations_turn", "ix_generations_queue"),
    ),
    "claim: next turn": (
        scheduler._turn_order([ANY_ID], []),
        {},
        ("ix_queue_turns_next", "ix_queue_turns_model"),
    ),
    "claim: the turn's head": (
        scheduler._TURN_HEAD,
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
    "queued by model": (reconciler.queued_by_model(), {}, (*QUEUE, "ix_generations_turn")),
    "expired leases": (reconciler.expired_leases(NOW, 1000), {}, ("ix_generations_active",)),
    "due webhooks": (webhooks.due_query(NOW, 500), {}, ("ix_webhook_deliveries_due",)),
}


@pytest.mark.parametrize("name", HOT)
def test_generic_plan_uses_the_partial_index(conn: Connection, name: str) -> None:
    statement, params, indexes = HOT[name]
    plan = "\n".join(generic_plan(conn, statement, params))
    assert any(index in plan for index in indexes), plan
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
        params = {"user_id": user, "priority": 5, "created_at": fourth}
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
