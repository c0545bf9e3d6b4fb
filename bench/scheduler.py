"""The scheduler's figures, side by side in one run, on real Postgres with the real claim and
completion statements (`lifecycle.claim_next`, `lifecycle.complete`); workers are threads that
"run" a job by sleeping its duration, so the figures are the scheduler's, not the model's.

    python -m bench.scheduler [--quick]

- claim cost: one claim (rolled back) with 100,000 jobs of 1,000 users queued vs 10 jobs of
  10 users (goal: ratio <= 1.2);
- fleet: 1, 8 and 32 claimers against 100,000 queued jobs of 1,000 users, each claiming and
  completing in a loop: claims/s, p99 claim latency, no job claimed twice, turns kept (in the
  first 1,000 claims no user got more than 2) (goal: >= 300 claims/s at 32, p99 < 50 ms);
- fairness: a heavy user's N jobs queued, then a light user's 5, one worker: the light jobs'
  waits in job-durations, N = 20 and 200, the scheduler vs plain FIFO (oldest first);
- affinity: 40 jobs alternating between two models, one worker that holds one pipeline and
  pays a load to switch: loads and total time, affinity on vs off.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from bench.stack import percentile, stack

BULK = """
INSERT INTO generations (id, user_id, model_id, model_key, status, prompt, negative_prompt,
    params, pose_source, input_key, credit_cost, priority, progress_step, progress_total,
    outputs, attempts, created_at, published_at)
SELECT gen_random_uuid(), u.id, :model_id, :model_key, 'queued', 'p', '',
    '{"num_inference_steps": 2, "width": 128, "height": 128}'::json, 'template',
    'inputs/x/image.png', 1, 5, 0, 0, '[]'::json, 0,
    :start + make_interval(secs => g * 0.001 + u.n * 0.000001),
    :start + make_interval(secs => g * 0.001)
FROM generate_series(1, :per_user) AS g
CROSS JOIN (SELECT id, row_number() OVER (ORDER BY email) AS n FROM users
            WHERE email LIKE :pattern) AS u
"""
# The turns of bulk-inserted jobs (a submit keeps them; the bulk load goes around it).
TURNS = """
INSERT INTO queue_turns (user_id, model_id, priority, queued, waiting_since, last_started_at)
SELECT user_id, model_id, max(priority), count(*), min(created_at), '1970-01-01+00'
FROM generations
WHERE status = 'queued' GROUP BY user_id, model_id
ON CONFLICT (user_id, model_id) DO UPDATE SET queued = EXCLUDED.queued,
    waiting_since = EXCLUDED.waiting_since
"""


class Bench:
    def __init__(self, engine: Engine) -> None:
        from posegen.settings import Settings

        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.settings = Settings()
        with self.sessions() as s:
            rows = s.execute(text("SELECT model_key, id FROM ai_models")).all()
        self.models = {key: str(model_id) for key, model_id in rows}

    def reset(self) -> None:
        with self.engine.begin() as c:
            c.execute(text("TRUNCATE generations, queue_turns, user_turns, users CASCADE"))

    def users(self, prefix: str, n: int) -> None:
        with self.engine.begin() as c:
            c.execute(
                text(
                    "INSERT INTO users (id, email, tier, credits, webhook_secret, created_at)"
                    " SELECT gen_random_uuid(), :prefix || '-' || lpad(g::text, 5, '0'),"
                    " 'enterprise', 1000000, 'whsec_x', now() FROM generate_series(1, :n) g"
                ),
                {"prefix": prefix, "n": n},
            )

    def queue(self, prefix: str, per_user: int, *, model_key: str = "tiny-sd15-openpose",
              start: dt.datetime | None = None) -> None:  # fmt: skip
        with self.engine.begin() as c:
            c.execute(
                text(BULK),
                {
                    "model_id": self.models[model_key], "model_key": model_key,
                    "per_user": per_user, "pattern": f"{prefix}%",
                    "start": start or dt.datetime.now(dt.UTC),
                },
            )  # fmt: skip
            c.execute(text(TURNS))
            c.execute(text("ANALYZE generations; ANALYZE queue_turns"))

    def claim(
        self, s: Session, worker: str, models: Sequence[str], warm: Sequence[str] = ()
    ) -> Any:
        from posegen import lifecycle

        return lifecycle.claim_next(
            s, worker_id=worker, models=[self.models[m] for m in models],
            warm=[self.models[m] for m in warm], lease_seconds=600, settings=self.settings,
        )  # fmt: skip

    def user_id(self, pattern: str) -> str:
        with self.sessions() as s:
            return str(s.scalar(text("SELECT id FROM users WHERE email LIKE :p"), {"p": pattern}))

    def fifo_claim(self, s: Session, worker: str) -> Any:
        """Plain FIFO, the order before the scheduler: the oldest queued job."""
        from db.models import Generation
        from posegen import lifecycle

        job_id = s.scalar(
            select(Generation.id)
            .where(Generation.status == "queued")
            .order_by(Generation.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if job_id is None:
            return None
        return lifecycle.claim(s, job_id=job_id, worker_id=worker, lease_seconds=600)

    def complete(self, s: Session, claim: Any, worker: str) -> None:
        from posegen import lifecycle

        lifecycle.complete(s, job_id=claim.job.id, worker_id=worker, outputs=[], steps=2)


def claim_cost(b: Bench, repeats: int) -> dict[str, Any]:
    def timed() -> float:
        times = []
        for _ in range(repeats):
            with b.sessions() as s:
                started = time.perf_counter()
                assert b.claim(s, "w", ["tiny-sd15-openpose"]) is not None
                times.append(time.perf_counter() - started)
                s.rollback()
        return statistics.median(times) * 1000

    b.reset()
    b.users("small", 10)
    b.queue("small", 1)
    small = timed()
    b.reset()
    b.users("big", 1000)
    b.queue("big", 100)
    big = timed()
    return {
        "queued_10_ms": round(small, 3),
        "queued_100000_ms": round(big, 3),
        "ratio": round(big / small, 3),
    }


def fleet(b: Bench, claimers: int, seconds: float, job_s: float = 0.0) -> dict[str, Any]:
    """`claimers` threads claiming and completing against the 100,000-job queue; each "runs"
    its job for `job_s` between the claim and the completion (0: back to back)."""
    latencies: list[float] = []
    claimed: list[tuple[float, str, str]] = []  # (when, job, user)
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def loop(n: int) -> None:
        worker = f"w{n}"
        while time.monotonic() < stop:
            with b.sessions() as s:
                started = time.perf_counter()
                claim = b.claim(s, worker, ["tiny-sd15-openpose"])
                s.commit()
                took = time.perf_counter() - started
                if claim is None:
                    return
                time.sleep(job_s)
                b.complete(s, claim, worker)
                s.commit()
            with lock:
                latencies.append(took)
                claimed.append((time.monotonic(), claim.job.id, claim.job.user_id))

    threads = [threading.Thread(target=loop, args=(n,)) for n in range(claimers)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    with b.sessions() as s:
        twice = s.scalar(text("SELECT count(*) FROM generations WHERE attempts > 1"))
        # The turns: in the order the jobs started (as the database recorded it), no user
        # should start a second job before every user waiting has started one.
        users = s.scalar(text("SELECT count(DISTINCT user_id) FROM queue_turns"))
        order = s.scalars(
            text(
                "SELECT user_id FROM generations WHERE started_at IS NOT NULL"
                " ORDER BY started_at LIMIT :n"
            ),
            {"n": users},
        ).all()
    first = Counter(order)
    return {
        "claimers": claimers,
        "job_s": job_s,
        "claims": len(claimed),
        "claims_per_s": round(len(claimed) / elapsed, 1),
        "claim_p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "claim_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "claimed_twice": int(twice or 0) + len(claimed) - len({j for _, j, _ in claimed}),
        "most_starts_of_one_user_in_first_1000": max(first.values()) if first else 0,
    }


def fairness(b: Bench, heavy_jobs: int, *, fifo: bool, duration: float) -> dict[str, Any]:
    """One worker; a heavy user's backlog queued, then a light user's 5 jobs: the light
    jobs' waits (start - submit), in job-durations."""
    b.reset()
    b.users("heavy", 1)
    b.users("light", 1)
    now = dt.datetime.now(dt.UTC)
    b.queue("heavy", heavy_jobs, start=now - dt.timedelta(seconds=1))
    b.queue("light", 5, start=now)
    light_user = b.user_id("light-%")
    lights_started = 0
    while lights_started < 5:
        with b.sessions() as s:
            claim = b.fifo_claim(s, "w") if fifo else b.claim(s, "w", ["tiny-sd15-openpose"])
            s.commit()
            if claim is None:
                break
            lights_started += claim.job.user_id == light_user
            time.sleep(duration)
            b.complete(s, claim, "w")
            s.commit()
    with b.sessions() as s:
        rows = s.execute(
            text(
                "SELECT g.started_at, g.created_at, u.email FROM generations g"
                " JOIN users u ON u.id = g.user_id WHERE g.started_at IS NOT NULL"
                " ORDER BY g.started_at"
            )
        ).all()
    # The light jobs' waits in job-durations: the jobs that started before each one, counted
    # from when it was queued (all of the heavy backlog was queued first).
    light = [i for i, row in enumerate(rows) if row.email.startswith("light")]
    in_durations = [float(i - n) for n, i in enumerate(light)]  # minus its own earlier jobs
    return {
        "heavy_jobs": heavy_jobs,
        "order": "fifo" if fifo else "scheduler",
        "light_wait_jobs_median": statistics.median(light),
        "light_wait_jobs_max": max(light),
        "light_wait_excluding_own_jobs_median": statistics.median(in_durations),
    }


def affinity(b: Bench, *, on: bool, duration: float, load_s: float) -> dict[str, Any]:
    """One worker holding one pipeline; 40 jobs alternating between two models."""
    b.reset()
    b.users("alt", 2)
    now = dt.datetime.now(dt.UTC)
    models = ["tiny-sd15-openpose", "tiny-sdxl-openpose"]
    # Alternating in time: one user's jobs on one model, the other's on the other.
    for i, key in enumerate(models):
        b.queue(
            f"alt-{i + 1:05d}", 20, model_key=key, start=now + dt.timedelta(microseconds=500 * i)
        )
    held: str | None = None
    loads = 0
    started = time.monotonic()
    while True:
        with b.sessions() as s:
            claim = b.claim(s, "w", models, warm=[held] if (on and held) else [])
            s.commit()
            if claim is None:
                break
            if claim.job.model_key != held:
                loads += 1
                held = claim.job.model_key
                time.sleep(load_s)
            time.sleep(duration)
            b.complete(s, claim, "w")
            s.commit()
    return {"affinity": on, "loads": loads, "total_s": round(time.monotonic() - started, 3)}


def run(quick: bool) -> dict[str, Any]:
    repeats, seconds = (50, 3.0) if quick else (200, 10.0)
    with stack() as st:
        engine = create_engine(st.database_url, pool_size=40, max_overflow=0)
        b = Bench(engine)
        result: dict[str, Any] = {"benchmark": "scheduler", "date": time.strftime("%Y-%m-%d")}
        result["claim_cost"] = claim_cost(b, repeats)
        result["fleet"] = []
        for claimers in (1, 8, 32):
            b.reset()
            b.users("fleet", 1000)
            b.queue("fleet", 100)
            result["fleet"].append(fleet(b, claimers, seconds))
        duration = 0.02
        result["fairness"] = [
            fairness(b, n, fifo=fifo, duration=duration)
            for n in (20, 200)
            for fifo in (False, True)
        ]
        result["affinity"] = [
            affinity(b, on=on, duration=duration, load_s=10 * duration) for on in (True, False)
        ]
        engine.dispose()
    sched = {r["heavy_jobs"]: r for r in result["fairness"] if r["order"] == "scheduler"}
    at32 = result["fleet"][-1]
    on, off = result["affinity"]
    result["goals"] = {
        "claim_cost_ratio<=1.2": result["claim_cost"]["ratio"] <= 1.2,
        "claims_per_s_at_32>=300": at32["claims_per_s"] >= 300,
        "claim_p99_at_32<50ms": at32["claim_p99_ms"] < 50,
        "no_job_claimed_twice": all(f["claimed_twice"] == 0 for f in result["fleet"]),
        "light_wait_same_within_20%_for_N=20_and_200": (
            abs(sched[200]["light_wait_jobs_median"] - sched[20]["light_wait_jobs_median"])
            <= 0.2 * sched[20]["light_wait_jobs_median"]
        ),
        "affinity_loads<=4": on["loads"] <= 4,
        "affinity_total<=0.8x_off": on["total_s"] <= 0.8 * off["total_s"],
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, shorter fleet runs")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=2))


if __name__ == "__main__":
    main()
