"""One customer's slow webhook endpoint against another's: does the fast one wait?

    python -m bench.webhooks [--slow-events 50] [--fast-events 50] [--slow-seconds 9]

A real stack (API, a housekeeping worker `--queues webhooks,maintenance --concurrency 2` and
beat); two receivers on loopback: one answers after `--slow-seconds`, the other at once. The
slow customer's jobs end first (`--slow-events` canceled jobs: one `generation.canceled`
event each), then, while the slow endpoint is still answering, the fast customer's, one
every 50 ms. Reports, for the fast endpoint, how long after its job ended each event arrived
(median, p99, max; goal p99 < 1 s), and when the slow endpoint had all of its events.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from bench.stack import percentile, small_png, stack


class Receiver:
    def __init__(self, delay: float) -> None:
        self.arrivals: dict[str, float] = {}  # job id -> time.time() of its event
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.arrivals[json.loads(body)["data"]["id"]] = time.time()
                time.sleep(delay)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        ThreadingHTTPServer.daemon_threads = True
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.arrivals) < count and time.monotonic() < deadline:
            time.sleep(0.05)


def end_jobs(api: httpx.Client, key: str, url: str, count: int, pause: float) -> dict[str, float]:
    """Submit and cancel `count` jobs with this webhook; each job's end, as time.time()."""
    headers = {"Authorization": f"Bearer {key}"}
    ended = {}
    for _ in range(count):
        job = api.post(
            "/v1/generations",
            headers=headers,
            data={"model_key": "tiny-sd15-openpose", "pose_template_id": "standing",
                  "webhook_url": url},
            files={"image": ("p.png", small_png(), "image/png")},
        ).json()  # fmt: skip
        canceled = api.post(f"/v1/generations/{job['id']}/cancel", headers=headers).json()
        ended[job["id"]] = dt.datetime.fromisoformat(canceled["finished_at"]).timestamp()
        time.sleep(pause)
    return ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slow-events", type=int, default=50)
    parser.add_argument("--fast-events", type=int, default=50)
    parser.add_argument("--slow-seconds", type=float, default=9.0)
    args = parser.parse_args()
    slow, fast = Receiver(args.slow_seconds), Receiver(0)
    with stack(POSEGEN_WEBHOOK_ALLOW_PRIVATE="true") as s:
        base = s.api()
        s.start("worker", "--queues", "webhooks,maintenance", "--concurrency", "2", log="hk")
        s.start("beat", log="beat")
        slow_key, fast_key = s.user_key(), s.user_key()
        with httpx.Client(base_url=base, timeout=30) as api:
            end_jobs(api, fast_key, fast.url, 1, 0)  # the worker is up and warm
            fast.wait(1, timeout=120)
            fast.arrivals.clear()
            started = time.time()
            end_jobs(api, slow_key, slow.url, args.slow_events, 0)
            ended = end_jobs(api, fast_key, fast.url, args.fast_events, 0.05)
            fast.wait(args.fast_events, timeout=60)
            slow.wait(args.slow_events, timeout=args.slow_events * args.slow_seconds + 120)
    late = [fast.arrivals[job] - at for job, at in ended.items() if job in fast.arrivals]
    result = {
        "benchmark": "webhooks",
        "date": time.strftime("%Y-%m-%d"),
        "slow_endpoint": {
            "answers_after_s": args.slow_seconds,
            "events": args.slow_events,
            "received": len(slow.arrivals),
            "last_received_after_s": round(max(slow.arrivals.values()) - started, 2)
            if slow.arrivals
            else None,
        },
        "fast_endpoint": {
            "events": args.fast_events,
            "received": len(late),
            "delay_after_job_end_s": {
                "median": round(statistics.median(late), 3),
                "p99": round(percentile(late, 0.99), 3),
                "max": round(max(late), 3),
            },
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
