"""What a status poll is made of, against /health: CPU per call, in one process.

    python -m bench.floor [--calls 3000] [--repeats 5]

`bench.api`'s status goal (>= 50 % of /health's requests/s) asks that a poll cost at most
twice a /health request. This measures, side by side in one process on the event loop (no
HTTP, no load generator), the CPU time of:

- `health`: GET /health through the whole ASGI app (middleware, routing, the JSON answer);
- `status`: a GET /v1/generations/{id} through the same app (the key, the job and its
  queue position in one statement, the job JSON);
- `round_trip`: one `SELECT 1` on a held asyncpg connection, the least any database read
  costs this process;
- `poll_query`: the poll's statement alone, through the API's pool (`db.fast.AsyncReads`).

`floor_ratio` = health / (health + round_trip): the status ratio a poll that cost nothing
but one round trip on top of /health would reach.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import httpx

from bench import load
from bench.stack import small_png, stack


async def _asgi_get(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> int:
    """One GET through the ASGI app, as uvicorn would call it; returns the status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def _cpu_per_call(fn: Any, calls: int) -> float:
    started = time.process_time()
    for _ in range(calls):
        await fn()
    return (time.process_time() - started) / calls * 1000


async def _measure(app: Any, job_id: str, key: str, database_url: str, args: Any) -> dict:
    import asyncpg
    from sqlalchemy import make_url

    from api import poll
    from posegen.accounts import bearer_key_hash
    from posegen.jobs import queries

    auth = [(b"authorization", f"Bearer {key}".encode())]
    url = make_url(database_url).set(drivername="postgresql")
    held = await asyncpg.connect(url.render_as_string(hide_password=False))
    # The table holds fewer than POSITION_CAP queued jobs: no cut-off, as the app polls it.
    params = {"job_id": job_id, "key_hash": bearer_key_hash(f"Bearer {key}")} | queries.NO_CUTOFF

    async def health() -> None:
        assert await _asgi_get(app, "/health", []) == 200

    async def status() -> None:
        assert await _asgi_get(app, f"/v1/generations/{job_id}", auth) == 200

    async def round_trip() -> None:
        await held.fetchval("SELECT 1")

    async def poll_query() -> None:
        await app.state.async_reads.first(poll.POLL, params)

    kinds = {"health": health, "status": status, "round_trip": round_trip, "poll_query": poll_query}
    runs: dict[str, list[float]] = {name: [] for name in kinds}
    for fn in kinds.values():
        await _cpu_per_call(fn, 200)  # warm: statement caches, pools
    for _ in range(args.repeats):  # interleaved, so a slow spell of the VM hits all four
        for name, fn in kinds.items():
            runs[name].append(await _cpu_per_call(fn, args.calls))
    await held.close()
    return {name: round(statistics.median(values), 4) for name, values in runs.items()} | {
        "runs_ms": {name: [round(v, 4) for v in values] for name, values in runs.items()}
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with stack() as s:
        base = s.api()  # for the job to poll; the measured app runs in this process
        key = s.user_key()
        content_type, body = load.multipart(
            {"model_key": "tiny-sd15-openpose", "pose_template_id": "standing"},
            {"image": ("p.png", small_png(), "image/png")},
        )
        headers = {"Authorization": f"Bearer {key}", "Content-Type": content_type}
        for _ in range(20):  # a queue, so the polled job has a position to count
            job_id = httpx.post(f"{base}/v1/generations", headers=headers, content=body).json()[
                "id"
            ]
        os.environ.update(s.env)
        from api.app import create_app
        from posegen.settings import Settings

        app = create_app(Settings())

        async def run() -> dict:
            async with app.router.lifespan_context(app):
                return await _measure(app, job_id, key, s.database_url, args)

        cpu_ms = asyncio.run(run())
    health, status, trip = cpu_ms["health"], cpu_ms["status"], cpu_ms["round_trip"]
    result = {
        "benchmark": "floor",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "calls": args.calls,
        "repeats": args.repeats,
        "cpu_ms_per_call": cpu_ms,
        "status_over_health_cpu": round(status / health, 2),
        "floor_ratio": round(health / (health + trip), 3),
    }
    print(json.dumps(result, indent=2))
    print(
        f"CPU per call: health {health:.3f} ms | status {status:.3f} ms"
        f" ({status / health:.1f}x) | round trip {trip:.3f} ms | poll query"
        f" {cpu_ms['poll_query']:.3f} ms | floor ratio {result['floor_ratio']}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
