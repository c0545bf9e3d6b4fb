"""API cost: submits and status polls against the same server's /health, side by side.

    python -m bench.api [--concurrency 16] [--seconds 8]

A real `posegen api` process on Postgres + Redis, no worker consuming. Goals on the 2-core
development machine: submit >= 25% of /health's requests/s, status >= 50%, status p99 <= 20 ms.
The load generator shares the machine, so only the ratios travel.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
from typing import Any

import httpx

from bench.stack import percentile, small_png, stack


async def _load(
    base: str, *, make: Any, concurrency: int, seconds: float
) -> tuple[list[float], int, int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

        async def one() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await make(client)
                latencies.append(time.perf_counter() - started)
                if response.status_code >= 400:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, errors, int(len(latencies) / elapsed)


def _summary(latencies: list[float], errors: int, rps: int) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": rps,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    image = small_png()
    with stack() as s:
        base = s.api()
        headers = {"Authorization": f"Bearer {s.user_key()}"}
        job_ids: list[str] = []

        async def health(client: httpx.AsyncClient) -> httpx.Response:
            return await client.get("/health")

        async def submit(client: httpx.AsyncClient) -> httpx.Response:
            response = await client.post(
                "/v1/generations",
                headers=headers,
                data={"model_key": "tiny-sd15-openpose", "pose_template_id": "standing"},
                files={"image": ("p.png", image, "image/png")},
            )
            if response.status_code == 202:
                job_ids.append(response.json()["id"])
            return response

        async def status(client: httpx.AsyncClient) -> httpx.Response:
            return await client.get(f"/v1/generations/{random.choice(job_ids)}", headers=headers)

        run = lambda make: asyncio.run(  # noqa: E731
            _load(base, make=make, concurrency=args.concurrency, seconds=args.seconds)
        )
        run(health)  # warm-up
        health_a = _summary(*run(health))
        submits = _summary(*run(submit))
        statuses = _summary(*run(status))
        health_b = _summary(*run(health))
    baseline_rps = statistics.mean([health_a["rps"], health_b["rps"]])
    result = {
        "benchmark": "api",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "concurrency": args.concurrency,
        "seconds_per_phase": args.seconds,
        "health": {"before": health_a, "after": health_b},
        "submit": submits,
        "status": statuses,
        "ratios": {
            "submit_rps_over_health": round(submits["rps"] / baseline_rps, 3),
            "status_rps_over_health": round(statuses["rps"] / baseline_rps, 3),
        },
        "goals": {
            "submit_rps_over_health>=0.25": submits["rps"] / baseline_rps >= 0.25,
            "status_rps_over_health>=0.50": statuses["rps"] / baseline_rps >= 0.50,
            "status_p99_ms<=20": statuses["p99_ms"] <= 20,
        },
    }
    print(json.dumps(result, indent=2))
    print(
        f"health {baseline_rps:.0f} rps | submit {submits['rps']} rps p99 {submits['p99_ms']} ms"
        f" | status {statuses['rps']} rps p99 {statuses['p99_ms']} ms",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
