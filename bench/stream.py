"""Event streams (`GET /v1/generations/{id}/events`) held by one API process.

    python -m bench.stream [--idle 1000] [--running-jobs 10] [--streams-per-job 10] [--steps 20]

A real stack: one API process (`posegen api`, one uvicorn worker), Redis, Postgres and, for
the second part, one worker on the tiny SD1.5 model. Clients are asyncio + httpx in this
process.

1. Idle: `--idle` jobs queued (no worker runs), one stream open on each. Reports the API
   process's CPU (% of one core, over 10 s) and RSS with the streams open, and before.
2. Running: `--running-jobs` jobs followed by `--streams-per-job` streams each, while a worker
   runs them one after another. Reports the API's CPU and RSS meanwhile, and each progress
   event's latency: from its append in Redis (the stream entry id's milliseconds: the worker
   appends it right after the step, from its event thread) to its arrival at a client
   (median, p99; goal p99 < 100 ms), and whether every stream got every event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import httpx
import psutil
from httpx_sse import aconnect_sse

from bench.stack import percentile, small_png, stack


def api_process(base_pid: int) -> psutil.Process:
    """The uvicorn process serving requests (the CLI may run it as a child)."""
    proc = psutil.Process(base_pid)
    children = proc.children(recursive=True)
    return children[-1] if children else proc


def usage(proc: psutil.Process, seconds: float) -> dict[str, float]:
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    busy = (after.user - before.user) + (after.system - before.system)
    return {
        "cpu_pct_of_one_core": round(100 * busy / seconds, 2),
        "rss_mib": round(proc.memory_info().rss / 2**20, 1),
    }


def submit(api: httpx.Client, key: str, **fields: Any) -> str:
    answer = api.post(
        "/v1/generations",
        headers={"Authorization": f"Bearer {key}"},
        data={"model_key": "tiny-sd15-openpose", "pose_template_id": "standing",
              **{k: str(v) for k, v in fields.items()}},
        files={"image": ("p.png", small_png(), "image/png")},
    )  # fmt: skip
    answer.raise_for_status()
    return str(answer.json()["id"])


async def follow(
    client: httpx.AsyncClient, key: str, job_id: str, seen: list[tuple[str, str, float]],
    opened: asyncio.Event | None = None,
) -> None:  # fmt: skip
    """Read one stream to its end: (event, id, arrival time.time()) of each event."""
    headers = {"Authorization": f"Bearer {key}"}
    async with aconnect_sse(
        client, "GET", f"/v1/generations/{job_id}/events", headers=headers
    ) as source:
        async for sse in source.aiter_sse():
            if sse.data:
                seen.append((sse.event, sse.id, time.time()))
                if opened is not None:
                    opened.set()


async def idle_part(base: str, key: str, jobs: list[str], proc: psutil.Process) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=None, limits=limits) as client:
        opened = [asyncio.Event() for _ in jobs]
        tasks = [
            asyncio.create_task(follow(client, key, job, [], flag))
            for job, flag in zip(jobs, opened, strict=True)
        ]
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(flag.wait() for flag in opened)), 300)
        open_s = time.perf_counter() - started
        measured = await asyncio.to_thread(usage, proc, 10.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"streams": len(jobs), "all_open_after_s": round(open_s, 2), **measured}


async def running_part(
    base: str, key: str, jobs: list[str], per_job: int, proc: psutil.Process
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    seen: list[list[tuple[str, str, float]]] = [[] for _ in range(len(jobs) * per_job)]
    async with httpx.AsyncClient(base_url=base, timeout=None, limits=limits) as client:
        tasks = [
            asyncio.create_task(follow(client, key, job, seen[i * per_job + n]))
            for i, job in enumerate(jobs)
            for n in range(per_job)
        ]
        samples = []
        while not all(task.done() for task in tasks):
            samples.append(await asyncio.to_thread(usage, proc, 2.0))
        await asyncio.gather(*tasks)
    latencies = [
        arrived * 1000 - int(entry_id.split("-")[0])
        for stream in seen
        for name, entry_id, arrived in stream
        if name == "progress"
    ]
    per_stream = [len(stream) for stream in seen]
    return {
        "jobs": len(jobs),
        "streams": len(seen),
        "events_per_stream": {"min": min(per_stream), "max": max(per_stream)},
        "every_stream_ended": all(stream and stream[-1][0] == "completed" for stream in seen),
        "cpu_pct_of_one_core_median": statistics.median(s["cpu_pct_of_one_core"] for s in samples),
        "rss_mib_max": max(s["rss_mib"] for s in samples),
        "progress_events": len(latencies),
        "event_latency_ms": {
            "median": round(statistics.median(latencies), 2),
            "p99": round(percentile(latencies, 0.99), 2),
            "max": round(max(latencies), 2),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--running-jobs", type=int, default=10)
    parser.add_argument("--streams-per-job", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    from worker.engine.tiny import build_tiny

    with stack(POSEGEN_LOG_LEVEL="WARNING") as s:
        build_tiny(s.var / "models")
        base = s.api()
        proc = api_process(s.procs[-1].pid)
        key = s.user_key()
        at_rest = usage(proc, 5.0)
        with httpx.Client(base_url=base, timeout=60) as api:
            idle_jobs = [submit(api, key) for _ in range(args.idle)]
        idle = asyncio.run(idle_part(base, key, idle_jobs, proc))
        with httpx.Client(base_url=base, timeout=60) as api:
            for job in idle_jobs:  # out of the way of the running part
                api.post(
                    f"/v1/generations/{job}/cancel", headers={"Authorization": f"Bearer {key}"}
                )
            running_jobs = [
                submit(api, key, num_inference_steps=args.steps, strength=1.0)
                for _ in range(args.running_jobs)
            ]
        s.start("worker", "--concurrency", "1", log="worker")
        running = asyncio.run(running_part(base, key, running_jobs, args.streams_per_job, proc))
    print(
        json.dumps(
            {
                "benchmark": "stream",
                "date": time.strftime("%Y-%m-%d"),
                "api_at_rest": at_rest,
                "idle_streams": idle,
                "running_streams": running,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
