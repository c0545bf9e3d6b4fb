"""API cost: submits and status polls against the same server's /health, side by side.

    python -m bench.api [--concurrency 16] [--seconds 8] [--repeats 3] [--workers 1]
        [--threads N] [--image small|photo] [--model MODEL_KEY]

A real `posegen api` process on Postgres + Redis, no worker consuming. Each repeat runs
/health, submit and status back to back; the figures are medians over the repeats. Goals on
the 2-core development machine: submit >= 25% of /health's requests/s, status >= 50%,
status p99 <= 20 ms. The load comes from wrk when it is installed (see bench/load.py).
`--image photo` submits a 12-megapixel phone JPEG (about 1 MB) instead of the small PNG: what
a submit costs when the upload has to be decoded and fitted (to 512x512 with
`--model sd15-openpose`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

from sqlalchemy import create_engine, text

from bench import load
from bench.stack import phone_photo_jpeg, small_png, stack


def _median(results: list[load.Result]) -> dict[str, Any]:
    return {
        "rps": round(statistics.median(r.rps for r in results), 1),
        "p50_ms": round(statistics.median(r.p50_ms for r in results), 2),
        "p99_ms": round(statistics.median(r.p99_ms for r in results), 2),
        "errors": sum(r.errors for r in results),
        "runs": [r.as_dict() for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--threads", type=int, help="POSEGEN_API_THREADS (default: the setting's)")
    parser.add_argument("--image", choices=["small", "photo"], default="small")
    parser.add_argument("--model", default="tiny-sd15-openpose", help="the submits' model_key")
    args = parser.parse_args()
    upload = (
        ("p.png", small_png(), "image/png")
        if args.image == "small"
        else ("photo.jpg", phone_photo_jpeg(), "image/jpeg")
    )
    content_type, body = load.multipart(
        {"model_key": args.model, "pose_template_id": "standing"}, {"image": upload}
    )
    threads = {"POSEGEN_API_THREADS": str(args.threads)} if args.threads else {}
    with stack(**threads) as s:
        base = s.api(workers=args.workers)
        auth = {"Authorization": f"Bearer {s.user_key()}"}
        health = load.Request(paths=["/health"])
        submit = load.Request(
            paths=["/v1/generations"],
            method="POST",
            headers={**auth, "Content-Type": content_type},
            body=body,
        )

        def go(request: load.Request) -> load.Result:
            # wrk stops without waiting for its requests in flight, and a submit takes the
            # server some 200 ms at 16 clients: a phase that began at once would spend its
            # first fifth of a second finishing the last phase's submits (status p99 at 16
            # clients 40 ms that way, 14 ms on an idle server). Each phase starts idle.
            time.sleep(1.0)
            return load.run(base, request, concurrency=args.concurrency, seconds=args.seconds)

        go(health)  # warm-up
        # Status polls need jobs; a first round of submits makes them.
        go(submit)
        engine = create_engine(s.database_url)
        with engine.connect() as conn:
            ids = [str(i) for i in conn.scalars(text("SELECT id FROM generations LIMIT 2000"))]
        engine.dispose()
        status = load.Request(paths=[f"/v1/generations/{i}" for i in ids], headers=auth)

        rounds: dict[str, list[load.Result]] = {"health": [], "submit": [], "status": []}
        for _ in range(args.repeats):
            rounds["health"].append(go(health))
            rounds["submit"].append(go(submit))
            rounds["status"].append(go(status))
        queued = len(ids)
    figures = {name: _median(results) for name, results in rounds.items()}
    health_rps = figures["health"]["rps"]
    submit_ratio = figures["submit"]["rps"] / health_rps
    status_ratio = figures["status"]["rps"] / health_rps
    no_errors = all(phase["errors"] == 0 for phase in figures.values())
    result = {
        "benchmark": "api",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "load_generator": load.generator(),
        "concurrency": args.concurrency,
        "submit_image": args.image,
        "submit_model": args.model,
        "submit_body_bytes": len(body),
        "api_workers": args.workers,
        "api_threads": args.threads or "default",
        "seconds_per_phase": args.seconds,
        "repeats": args.repeats,
        "status_jobs": queued,
        **figures,
        "ratios": {
            "submit_rps_over_health": round(submit_ratio, 3),
            "status_rps_over_health": round(status_ratio, 3),
        },
        # A goal counts only with no failed request in any phase: a fast error is no answer.
        "goals": {
            "submit_rps_over_health>=0.25": submit_ratio >= 0.25 and no_errors,
            "status_rps_over_health>=0.50": status_ratio >= 0.50 and no_errors,
            "status_p99_ms<=20": figures["status"]["p99_ms"] <= 20 and no_errors,
        },
    }
    print(json.dumps(result, indent=2))
    print(
        f"health {health_rps:.0f} rps | submit {figures['submit']['rps']:.0f} rps"
        f" ({submit_ratio:.2f}) p99 {figures['submit']['p99_ms']} ms | status"
        f" {figures['status']['rps']:.0f} rps ({status_ratio:.2f})"
        f" p99 {figures['status']['p99_ms']} ms",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
