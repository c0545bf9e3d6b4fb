"""What the queue adds to one job, and what it costs a busy worker.

    python -m bench.overhead [--jobs 50]        # dispatch latency and added cost per job
    python -m bench.overhead --throughput 100   # 100 jobs through one worker vs a bare loop
        [--rounds 20]                           # in 20 alternating blocks of 5
        [--torch-threads N]                     # both sides on N torch threads
        [--record-behind auto|on|off]           # the worker's POSEGEN_RECORD_BEHIND
    python -m bench.overhead --bookkeeping 100  # the worker's own work a job, in process
        [--block 5]                             # (whole, and left on the path when recorded
                                                # behind), in alternating blocks of 5

One idle worker (`posegen worker --concurrency 1`) with a warm tiny model, on Postgres +
Redis. Dispatch = started_at - created_at (commit, publish, pick-up, claim). Bookkeeping =
a job's `run_job` minus its engine call, in this process (claim, catalog read, storage,
heartbeat, completion: what the worker does per job besides the model). Added cost =
median(finished_at - created_at) - median(bare pipeline call, same model and params, in
this process), the two alternating. Throughput: 100 jobs through the worker against 100 bare
calls in one loop, in alternating blocks (see `throughput`). Goals: dispatch <= 20 ms
median; added cost <= 50 ms and <= 3 %; throughput ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.stack import Stack, astronaut_png, fitted_astronaut, percentile, stack

STEPS, SIZE = 4, 128
FIELDS = {
    "model_key": "tiny-sd15-openpose",
    "pose_template_id": "standing",
    "num_inference_steps": str(STEPS),
    "strength": "1.0",
    "seed": "7",
}


def _ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def bare_runner(model_dir: Path, torch_threads: int = 0) -> Any:
    """The same job as a bare diffusers call in this process: model warm, images prepared,
    on `torch_threads` threads (0: torch's default, as the worker's setting).
    Returns a function that runs it once and answers its seconds."""
    from PIL import Image

    from posegen.skeleton import draw_skeleton
    from worker.engine.engine import Engine, EngineConfig, EngineJob
    from worker.engine.run import RunParams, run_pipeline

    stored = fitted_astronaut(SIZE, SIZE)
    params = RunParams(
        prompt="a portrait avatar of a person", negative_prompt="blurry",
        num_inference_steps=STEPS, guidance_scale=7.5, controlnet_conditioning_scale=1.0,
        strength=1.0, seed=7, width=SIZE, height=SIZE,
    )  # fmt: skip
    engine = Engine(
        EngineConfig(model_dir=model_dir, pose_backend="mediapipe", torch_threads=torch_threads)
    )
    job = EngineJob(
        model_key="tiny-sd15-openpose",
        family="sd15",
        base_model="tiny-sd15",
        controlnet_model="tiny-sd15-controlnet",
        params=params,
        image=stored,
    )
    pipe = engine.pipeline(job)
    subject = Image.open(io.BytesIO(stored)).convert("RGB")
    from bench.engine import STANDING

    control = draw_skeleton(STANDING, width=SIZE, height=SIZE)

    def once() -> float:
        started = time.perf_counter()
        run_pipeline(pipe, init_image=subject, control_image=control, params=params)
        return time.perf_counter() - started

    for _ in range(3):
        once()
    return once


def _submit(base: str, headers: dict[str, str], image: bytes, *, steps: int = STEPS) -> str:
    response = httpx.post(
        f"{base}/v1/generations", headers=headers,
        data={**FIELDS, "num_inference_steps": str(steps)},
        files={"image": ("a.png", image, "image/png")}, timeout=30,
    )  # fmt: skip
    response.raise_for_status()
    return str(response.json()["id"])


def _wait(
    base: str, headers: dict[str, str], job_id: str, *, first: float = 0.0, every: float = 1.0
) -> dict[str, Any]:
    """The finished job. Timestamps are the server's, so polling slowly loses no precision,
    and polling fast would measure the bench: on a 2-core machine each poll (client, API,
    Postgres) preempts one of torch's two threads, and the other then waits at its next
    barrier. So: sleep `first`, then poll every `every` seconds."""
    time.sleep(first)
    while True:
        job: dict[str, Any] = httpx.get(f"{base}/v1/generations/{job_id}", headers=headers).json()
        if job["status"] in ("completed", "failed", "canceled"):
            if job["status"] != "completed":
                raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
            return job
        time.sleep(every)


def _wait_all(base: str, headers: dict[str, str], ids: list[str]) -> list[dict[str, Any]]:
    """Jobs run in order: wait for the last one (slowly), then read the others once."""
    _wait(base, headers, ids[-1])
    return [_wait(base, headers, job_id) for job_id in ids]


def _start(s: Stack) -> tuple[str, dict[str, str]]:
    s.cli("models", "build-tiny")
    base = s.api()
    headers = {"Authorization": f"Bearer {s.user_key()}"}
    s.start("worker", "--concurrency", "1", log="worker")
    image = astronaut_png()
    for _ in range(3):  # warm: the worker loads torch and the model on its first job
        _wait(base, headers, _submit(base, headers, image))
    return base, headers


def latency(jobs: int) -> dict[str, Any]:
    with stack() as s:
        base, headers = _start(s)
        bare_call = bare_runner(Path(s.env["POSEGEN_MODEL_DIR"]))
        image = astronaut_png()
        dispatch, total, run, bare = [], [], [], []
        expected = statistics.median(bare_call() for _ in range(5))
        for _ in range(jobs):  # one job through the queue, then one bare call: side by side
            job_id = _submit(base, headers, image)
            job = _wait(base, headers, job_id, first=expected * 1.5, every=0.1)
            created = _ts(job["created_at"])
            dispatch.append((_ts(job["started_at"]) - created).total_seconds())
            total.append((_ts(job["finished_at"]) - created).total_seconds())
            run.append((_ts(job["finished_at"]) - _ts(job["started_at"])).total_seconds())
            bare.append(bare_call())
    bare_median, total_median = statistics.median(bare), statistics.median(total)
    added = total_median - bare_median
    return {
        "benchmark": "overhead",
        "jobs": jobs,
        "dispatch_ms_median": round(statistics.median(dispatch) * 1000, 2),
        "submit_to_completed_ms_median": round(total_median * 1000, 2),
        "started_to_completed_ms_median": round(statistics.median(run) * 1000, 2),
        "bare_pipeline_ms_median": round(bare_median * 1000, 2),
        "added_ms_per_job": round(added * 1000, 2),
        "added_fraction": round(added / bare_median, 4),
        "goals": {
            "dispatch_ms<=20": statistics.median(dispatch) * 1000 <= 20,
            "added_ms<=50": added * 1000 <= 50,
            "added_fraction<=0.03": added / bare_median <= 0.03,
        },
    }


def throughput(
    jobs: int, rounds: int = 20, torch_threads: int = 0, record_behind: str = "auto"
) -> dict[str, Any]:
    """`jobs` jobs through the worker against as many bare calls, in `rounds` alternating
    blocks (a block through the queue and a block of bare calls while the worker idles, the
    bare block first in every other round), so both sides see the same machine and the same
    seconds. This VM's speed moves by ±20 % within a minute: with 5 blocks of 20 jobs the
    ratio of one run ranged 0.85-1.02 for the same code; short blocks pair better, and the
    median of the blocks' ratios is reported beside the ratio of the sums.

    A block's jobs are submitted while the worker is busy with a longer job ahead of them
    (not counted): on this 2-core machine the API's submits would otherwise take CPU from
    the block's first jobs, and that is the API's cost (bench.api), not the worker's. The
    worker's wall is from the block's first start to its last finish: runs, and the
    hand-offs between them.

    `torch_threads` (both sides; 0: torch's default, one per core): with 1 on this 2-core
    machine, a pipeline no longer waits at torch's barriers for a thread that something else
    (the API, Postgres, the worker's heartbeat) preempted."""
    per_round = max(1, jobs // rounds)
    walls: list[float] = []
    bares: list[float] = []
    handoffs: list[float] = []
    overlapped = 0
    with stack(POSEGEN_TORCH_THREADS=str(torch_threads), POSEGEN_RECORD_BEHIND=record_behind) as s:
        base, headers = _start(s)
        bare_call = bare_runner(Path(s.env["POSEGEN_MODEL_DIR"]), torch_threads)
        image = fitted_astronaut(SIZE, SIZE)

        def bare_block() -> None:
            bares.append(sum(bare_call() for _ in range(per_round)))

        for i in range(rounds):
            if i % 2:
                bare_block()
            ahead = _submit(base, headers, image, steps=max(20, per_round * 2))
            ids = [_submit(base, headers, image) for _ in range(per_round)]
            done = _wait_all(base, headers, [ahead, *ids])
            first_start = min(_ts(j["started_at"]) for j in done[1:])
            handoffs += [
                (_ts(b["started_at"]) - _ts(a["finished_at"])).total_seconds()
                for a, b in itertools.pairwise(done)
            ]
            last_submit = max(_ts(j["created_at"]) for j in done[1:])
            overlapped += int(first_start < last_submit)
            walls.append((max(_ts(j["finished_at"]) for j in done) - first_start).total_seconds())
            if not i % 2:
                bare_block()
    worker_wall, bare = sum(walls), sum(bares)
    return {
        "benchmark": "throughput",
        "jobs": per_round * rounds,
        "rounds": rounds,
        "torch_threads": torch_threads or "default",
        "record_behind": record_behind,
        "worker_wall_s": round(worker_wall, 3),
        "bare_loop_s": round(bare, 3),
        "ratio_bare_over_worker": round(bare / worker_wall, 4),
        # Each block's ratio: how much of the spread is the machine's minute-to-minute noise.
        "block_ratios": [round(b / w, 3) for b, w in zip(bares, walls, strict=True)],
        "block_ratio_median": round(
            statistics.median(b / w for b, w in zip(bares, walls, strict=True)), 4
        ),
        # A job's completion to the next one's claim: the ack, Celery's fetch and hand-over.
        "handoff_ms_median": round(statistics.median(handoffs) * 1000, 2),
        # Blocks whose jobs started before their last submit (the job ahead was too short).
        "blocks_overlapping_submits": overlapped,
        "goals": {"ratio>=0.95": bare / worker_wall >= 0.95},
    }


def bookkeeping(jobs: int, block: int = 5) -> dict[str, Any]:
    """What the worker does a job besides the model, measured inside `run_job` itself: the
    jobs are submitted through the API and run by `run_job` in this process, on the real
    engine, database and storage, with the engine's call timed from the outside. Each job's
    bookkeeping is its `run_job` time minus its engine time, so the pipeline's own noise (this
    VM's ±20 %) cancels within the job; no Celery (its hand-off is throughput's
    `handoff_ms_median`).

    Blocks of `block` consecutive jobs alternate between the two ways of recording a finished
    job: before `run_job` returns (`whole`: all the bookkeeping) and behind the next job, as
    the Celery task does (`on_path`: what is left on the job's path until it returns). In a
    recorded-behind block each job after the first hands its record over while the one before
    it may still be recording, and waits for it, as consecutive jobs on a worker do: those
    are `on_path`. The block's first job follows a drained finisher (`on_path_first`, apart).
    The finisher is drained between blocks, outside any job's time, so no whole job shares
    the machine with a record behind it."""
    import os

    with stack() as s:
        s.cli("models", "build-tiny")
        base = s.api()
        headers = {"Authorization": f"Bearer {s.user_key()}"}
        os.environ.update(s.env)  # the worker's settings, as `posegen worker` reads them
        from posegen.settings import get_settings

        get_settings.cache_clear()
        from worker.context import context
        from worker.runner import run_job

        ctx = context()
        ctx.warm()
        engine_calls: list[float] = []
        generate = ctx.engine.generate

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                engine_calls.append(time.perf_counter() - started)

        ctx.engine.generate = timed  # type: ignore[method-assign]
        image = fitted_astronaut(SIZE, SIZE)
        ids = [_submit(base, headers, image) for _ in range(jobs + 3)]
        time.sleep(1)  # let the API and Postgres settle after the submits
        finisher = ctx.finisher  # the one the Celery task hands its records to

        def drain() -> None:
            if finisher.wait() not in (None, "completed"):
                raise RuntimeError("a job recorded behind did not complete")

        def own_time(job_id: str, behind: Any) -> float:
            """The job's `run_job` time minus its engine call."""
            calls = len(engine_calls)
            started = time.perf_counter()
            outcome = run_job(ctx, job_id, behind=behind)
            total = time.perf_counter() - started
            if outcome != ("finishing" if behind else "completed") or len(engine_calls) != (
                calls + 1
            ):
                raise RuntimeError(f"job {job_id}: {outcome}")
            return total - engine_calls[calls]

        for job_id in ids[:3]:  # warm the engine and the statements; not counted
            own_time(job_id, None)
        whole: list[float] = []
        on_path: list[float] = []
        on_path_first: list[float] = []
        measured = ids[3:]
        for number, start in enumerate(range(0, len(measured), block)):
            drain()
            behind = finisher if number % 2 else None
            for position, job_id in enumerate(measured[start : start + block]):
                own = own_time(job_id, behind)
                if behind is None:
                    whole.append(own)
                else:
                    (on_path if position else on_path_first).append(own)
        drain()
        # Every job recorded, the behind ones included, as a caller sees them.
        statuses = {
            httpx.get(f"{base}/v1/generations/{job_id}", headers=headers).json()["status"]
            for job_id in ids
        }
        if statuses != {"completed"}:
            raise RuntimeError(f"jobs ended {statuses}, not all completed")
        engine_median = statistics.median(engine_calls[3:])
    if not on_path:
        raise RuntimeError("no recorded-behind job after another: raise --bookkeeping or --block")
    whole_median, on_path_median = statistics.median(whole), statistics.median(on_path)
    return {
        "benchmark": "bookkeeping",
        "jobs": jobs,
        "block": block,
        "bookkeeping_ms_median": round(whole_median * 1000, 2),
        "bookkeeping_ms_p90": round(percentile(whole, 0.9) * 1000, 2),
        "on_path_jobs": len(on_path),
        "on_path_ms_median": round(on_path_median * 1000, 2),
        "on_path_ms_p90": round(percentile(on_path, 0.9) * 1000, 2),
        "on_path_first_ms_median": round(statistics.median(on_path_first) * 1000, 2),
        "engine_call_ms_median": round(engine_median * 1000, 2),
        "bookkeeping_fraction": round(whole_median / engine_median, 4),
        "on_path_fraction": round(on_path_median / engine_median, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--throughput", type=int, default=0, metavar="N")
    parser.add_argument("--bookkeeping", type=int, default=0, metavar="N")
    parser.add_argument("--rounds", type=int, default=20, help="throughput: alternating blocks")
    parser.add_argument(
        "--block", type=int, default=5, help="bookkeeping: consecutive jobs a block"
    )
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="throughput: torch threads, both sides"
    )
    parser.add_argument(
        "--record-behind", choices=["auto", "on", "off"], default="auto",
        help="throughput: the worker's POSEGEN_RECORD_BEHIND",
    )  # fmt: skip
    args = parser.parse_args()
    if args.throughput:
        result = throughput(
            args.throughput, rounds=args.rounds, torch_threads=args.torch_threads,
            record_behind=args.record_behind,
        )  # fmt: skip
    elif args.bookkeeping:
        result = bookkeeping(args.bookkeeping, block=args.block)
    else:
        result = latency(args.jobs)
    result.update(date=time.strftime("%Y-%m-%d"), machine=platform.platform())
    print(json.dumps(result, indent=2))
    print({k: v for k, v in result.items() if k not in ("machine",)}, file=sys.stderr)


if __name__ == "__main__":
    main()
