"""Hot paths against a big table: submit and status medians with an empty jobs table versus
100,000 queued and 1,000,000 finished jobs (bulk-inserted), side by side in one run.

    python -m bench.scale [--queued 100000] [--finished 1000000] [--requests 200]

Goal: each ratio <= 1.2 (every hot query uses an index). Status is measured on the caller's
newest job, behind the whole queue, and (`status_near_head`) on a job fourth in it. Prints
the EXPLAIN of each hot query, and the reconciler's sweep over the full table (messages it
publishes again, and its time) with a real message on Redis for every queued job (counted as
the worker's sweep counts them), with some of those lost, and by age alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import create_engine, select, text

from bench.stack import small_png, stack

if TYPE_CHECKING:
    from posegen.queue import Dispatcher

FORM = {"model_key": "tiny-sd15-openpose", "pose_template_id": "standing"}


def measure(
    base: str, headers: dict[str, str], n: int, head_job: str | None = None
) -> dict[str, float]:
    image = small_png()
    client = httpx.Client(base_url=base, headers=headers, timeout=30)

    def submit() -> str:
        response = client.post(
            "/v1/generations", data=FORM, files={"image": ("p.png", image, "image/png")}
        )
        response.raise_for_status()
        return str(response.json()["id"])

    submit_times = []
    for _ in range(max(20, n // 4)):
        started = time.perf_counter()
        job_id = submit()
        submit_times.append(time.perf_counter() - started)
    status_times = []
    for _ in range(n):
        started = time.perf_counter()
        client.get(f"/v1/generations/{job_id}").raise_for_status()
        status_times.append(time.perf_counter() - started)
    result = {
        "submit_ms_median": round(statistics.median(submit_times) * 1000, 2),
        "status_ms_median": round(statistics.median(status_times) * 1000, 2),
    }
    if head_job is not None:  # a job near the head of the long queue: few ahead to count
        head_times = []
        for _ in range(n):
            started = time.perf_counter()
            client.get(f"/v1/generations/{head_job}").raise_for_status()
            head_times.append(time.perf_counter() - started)
        result["status_near_head_ms_median"] = round(statistics.median(head_times) * 1000, 2)
    client.close()
    return result


BULK = """
INSERT INTO generations (id, user_id, model_id, model_key, status, prompt, negative_prompt,
    params, pose_source, input_key, credit_cost, priority, progress_step, progress_total,
    outputs, attempts, created_at, published_at, started_at, finished_at)
SELECT gen_random_uuid(), :user_id, :model_id, 'tiny-sd15-openpose', CAST(:status AS varchar), 'p', '',
    '{"num_inference_steps": 2, "width": 128, "height": 128}'::json, 'template', 'inputs/x/image.png', 1, 5, 0, 0, '[]'::json, 1,
    now() - make_interval(secs => g), now() - make_interval(secs => g),
    CASE WHEN CAST(:status AS varchar) = 'completed' THEN now() - make_interval(secs => g) END,
    CASE WHEN CAST(:status AS varchar) = 'completed' THEN now() - make_interval(secs => g) + interval '2 seconds' END
FROM generate_series(1, :n) AS g
"""


# The scheduler's turns of the bulk-loaded jobs (inserted past the submit that keeps them).
TURNS = """
DELETE FROM queue_turns;
INSERT INTO queue_turns (user_id, model_id, priority, queued, waiting_since, last_started_at)
SELECT user_id, model_id, max(priority), count(*), min(created_at), '1970-01-01+00'
FROM generations
WHERE status = 'queued' GROUP BY user_id, model_id
"""


# The hot queries as the code builds them, each EXPLAIN ANALYZEd at full size with the plan
# Postgres keeps for it once the driver has prepared it (the generic plan: see db/plans.py).
def hot_queries(
    conn: Any, user_id: str, job_id: str, key: str
) -> dict[str, tuple[Any, dict[str, Any]]]:
    from api import poll as api_poll
    from db.models import Generation
    from posegen import catalog, reconciler, scheduler, webhooks
    from posegen.accounts import hash_key
    from posegen.jobs import queries
    from posegen.ratelimit import BLOCKING_JOB, blocking_params

    now = dt.datetime.now(dt.UTC)
    deep = conn.execute(  # a next page half-way down the filler user's 1.1 M jobs
        select(Generation.user_id, Generation.id, Generation.created_at)
        .where(Generation.user_id != user_id)
        .order_by(Generation.created_at.desc())
        .offset(500_000)
        .limit(1)
    ).one()
    deep_cursor = queries.encode_cursor(Generation(id=deep.id, created_at=deep.created_at))
    poll = {"job_id": job_id, "key_hash": hash_key(key)}
    return {
        "poll (key + job, one query)": (api_poll.POLL.statement, poll),
        "queue position of the caller's newest job, behind the whole queue": (
            scheduler.POSITION,
            {
                "user_id": user_id,
                "model_id": conn.execute(
                    text("SELECT id FROM ai_models WHERE model_key = 'tiny-sd15-openpose'")
                ).scalar_one(),
                "created_at": now,
            },
        ),
        "claim: the next turn (every model)": (
            scheduler.turn_order(
                [
                    str(
                        conn.execute(
                            text("SELECT id FROM ai_models WHERE model_key = 'tiny-sd15-openpose'")
                        ).scalar_one()
                    )
                ],
                [],
            ),
            {},
        ),
        "submit: model + template": (
            catalog._CHOICES,
            {"model_key": "tiny-sd15-openpose", "ref": "standing", "ref_id": None},
        ),
        "submit: rate limit (enterprise, 3000/min)": (
            BLOCKING_JOB,
            blocking_params(user_id, 3000),
        ),
        "eta_recent_runs": (queries.recent_runs("tiny-sd15-openpose"), {}),
        "list_for_user": (
            queries.list_statement(user_id, status=None, limit=20, cursor=None),
            {},
        ),
        "list_for_user, a next page half-way down 1.1 M jobs": (
            queries.list_statement(deep.user_id, status=None, limit=20, cursor=deep_cursor),
            {},
        ),
        "reconcile_stale_queued": (
            reconciler.stale_queued(now - dt.timedelta(seconds=120), 1000, "tiny-sd15-openpose"),
            {},
        ),
        "reconcile_queued_by_model": (reconciler.queued_by_model(), {}),
        "reconcile_expired_leases": (reconciler.expired_leases(now, 1000), {}),
        "webhooks_due": (webhooks.due_query(now, 500), {}),
    }


def publish_queued(engine: Any, broker: str) -> tuple[Dispatcher, float]:
    """One real generation message on the broker for every queued job, as the API sends it
    (the bulk-loaded jobs were never published): the generation queue's lists are emptied
    first, then each queued job's message goes through the `Dispatcher`. Answers the
    dispatcher, to count them with, and the seconds it took."""
    from sqlalchemy.orm import Session

    from db.models import Generation, status_is
    from posegen.queue import Dispatcher, generate_message, make_producer, model_queue
    from posegen.settings import Settings

    settings = Settings(broker_url=broker)
    dispatcher = Dispatcher(make_producer(settings))
    started = time.perf_counter()
    with dispatcher.celery.connection_for_write() as conn:
        conn.default_channel.client.delete(model_queue("tiny-sd15-openpose"))
    with Session(engine) as session:
        queued = session.scalars(
            select(Generation)
            .where(status_is(Generation.status, "queued"))
            .execution_options(yield_per=5000)
        )
        for job in queued:
            dispatcher.send(generate_message(job, settings))
    return dispatcher, time.perf_counter() - started


def sweeps(engine: Any, broker: str, repeats: int = 5, lost: int = 500) -> dict[str, Any]:
    """The reconciler's sweep over the full table, each rolled back (nothing it defers is
    sent): with the broker holding a real message for every queued job, counted on Redis as
    the worker's sweep counts them (`Dispatcher.waiting`); then with `lost` of them taken off
    the broker (the head of the queue's); and by age alone (a broker that cannot count).
    Republished messages a sweep, and the sweep's median ms."""
    from sqlalchemy.orm import Session

    from posegen import reconciler
    from posegen.queue import model_queue
    from posegen.settings import Settings

    settings = Settings()  # the default requeue age
    dispatcher, publish_s = publish_queued(engine, broker)
    with engine.connect() as conn:
        queued = sum(row[-1] for row in conn.execute(reconciler.queued_by_model()))
    queue = model_queue("tiny-sd15-openpose")  # the bulk-loaded jobs' model

    def waiting(name: str = queue) -> int | None:
        return dispatcher.waiting(name)

    result: dict[str, Any] = {
        "queued_jobs": queued,
        "messages_on_broker": waiting(),
        "publish_s": round(publish_s, 1),
    }

    def run(name: str, count: Any) -> None:
        times, republished = [], 0
        for _ in range(repeats):
            with Session(engine) as session:
                started = time.perf_counter()
                sweep = reconciler.reconcile(session, settings=settings, count_waiting=count)
                times.append(time.perf_counter() - started)
                republished = sweep.republished
                session.rollback()
        result[name] = {
            "republished": republished,
            "sweep_ms_median": round(statistics.median(times) * 1000, 1),
        }

    run("broker_counted", waiting)
    # Lose messages from the head of the queue: kombu pushes on the left and pops on the right.
    with dispatcher.celery.connection_for_write() as conn:
        taken = conn.default_channel.client.rpop(queue, lost) or []
    result["messages_lost"] = len(taken)
    result["messages_on_broker_after_loss"] = waiting()
    run("broker_counted_after_loss", waiting)
    run("by_age", None)
    dispatcher.celery.close()
    return result


def explain(conn: Any, statement: Any, params: dict[str, Any]) -> list[str]:
    from db.plans import generic_plan

    return generic_plan(conn, statement, params, analyze=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with stack() as s:
        base = s.api()
        headers = {"Authorization": f"Bearer {s.user_key()}"}
        measure(base, headers, 20)  # warm-up
        empty = measure(base, headers, args.requests)
        engine = create_engine(s.database_url)
        started = time.perf_counter()
        with engine.begin() as conn:
            filler = s.user_key  # a second user owns the bulk rows
            filler(credits=1)
            user_id = conn.execute(
                text("SELECT id FROM users ORDER BY created_at DESC LIMIT 1")
            ).scalar_one()
            model_id = conn.execute(
                text("SELECT id FROM ai_models WHERE model_key = 'tiny-sd15-openpose'")
            ).scalar_one()
            for status, n in (("completed", args.finished), ("queued", args.queued)):
                conn.execute(
                    text(BULK), {"user_id": user_id, "model_id": model_id, "status": status, "n": n}
                )
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("ANALYZE generations")
            )
            # The load wrote 1.1 M rows of WAL: write them back now, not while measuring.
            conn.execute(text("CHECKPOINT"))
        load_s = time.perf_counter() - started
        with engine.begin() as conn:  # the bench user's: the fourth job in the queue
            head_job = conn.execute(
                text(
                    "UPDATE generations SET user_id = (SELECT id FROM users ORDER BY created_at"
                    " LIMIT 1) WHERE id = (SELECT id FROM generations WHERE status = 'queued'"
                    " ORDER BY 9 - priority, created_at OFFSET 3 LIMIT 1) RETURNING id"
                )
            ).scalar_one()
            for statement in TURNS.split(";"):
                conn.execute(text(statement))
        full = measure(base, headers, args.requests, head_job=str(head_job))
        reconcile = sweeps(engine, s.env["POSEGEN_BROKER_URL"])
        plans: dict[str, list[str]] = {}
        with engine.connect() as conn:
            bench_user = conn.execute(
                text("SELECT id FROM users ORDER BY created_at LIMIT 1")
            ).scalar_one()
            job_id = conn.execute(
                text(
                    "SELECT id FROM generations WHERE user_id = :u ORDER BY created_at DESC LIMIT 1"
                ),
                {"u": bench_user},
            ).scalar_one()
            key = headers["Authorization"].removeprefix("Bearer ")
            for name, (statement, params) in hot_queries(conn, bench_user, job_id, key).items():
                plans[name] = explain(conn, statement, params)
        engine.dispose()
    result: dict[str, Any] = {
        "benchmark": "scale",
        "date": time.strftime("%Y-%m-%d"),
        "rows": {"queued": args.queued, "finished": args.finished, "bulk_load_s": round(load_s, 1)},
        "empty": empty,
        "full": full,
        "ratios": {
            "submit": round(full["submit_ms_median"] / empty["submit_ms_median"], 3),
            "status": round(full["status_ms_median"] / empty["status_ms_median"], 3),
            "status_near_head": round(
                full["status_near_head_ms_median"] / empty["status_ms_median"], 3
            ),
        },
        "reconcile": reconcile,
        "plans": plans,
    }
    result["goals"] = {f"{k}<=1.2": v <= 1.2 for k, v in result["ratios"].items()}
    print(json.dumps(result, indent=2))
    print(f"empty {empty} | full {full} | ratios {result['ratios']}", file=sys.stderr)
    print(f"reconciler sweep at full size: {reconcile}", file=sys.stderr)


if __name__ == "__main__":
    main()
