"""The client against a real API process and a real worker on the tiny model: a job submitted,
followed, downloaded; the same with the async client; the pages of the history; a webhook
the worker's housekeeping delivered, verified."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image
from sqlalchemy import func, select

from db.models import Generation
from posegen.client import TERMINAL, ApiError, AsyncClient, Client, WaitTimeout, verify_webhook
from tests.factories import astronaut_png, ledger_kinds

pytestmark = pytest.mark.slow
MODEL = "tiny-sd15-openpose"


def test_submit_wait_download(live_api, gpu_worker, make_account, sessions, tmp_path):
    account = make_account(credits=5)
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(astronaut_png())
    seen: list[tuple[str, int]] = []
    with Client(live_api, account.key) as client:
        job = client.submit(
            photo, model_key=MODEL, pose_template_id="waving", seed=7, num_inference_steps=4
        )
        assert job["status"] == "queued" and job["params"]["seed"] == 7
        done = client.wait(
            job["id"],
            timeout=120,
            on_update=lambda j: seen.append((j["status"], j["progress"]["step"])),
        )
        assert done["status"] == "completed", (done, gpu_worker.tail())
        out = tmp_path / "out.png"
        content = client.download(job["id"], 0, out)
        assert client.me()["credits"] == 4
    assert out.read_bytes() == content
    assert Image.open(io.BytesIO(content)).size == (128, 128)
    assert seen[0][0] == "queued" and seen[-1] == ("completed", 3)
    assert seen == sorted(
        seen, key=lambda s: (["queued", "processing", "completed"].index(s[0]), s[1])
    )
    assert ledger_kinds(sessions, job["id"]) == {"charge": 1}


def test_async_client_submits_bytes_and_a_file_object(live_api, gpu_worker, make_account):
    account = make_account(credits=5)

    async def scenario() -> tuple[dict, dict, bytes]:
        async with AsyncClient(live_api, account.key) as client:
            models = {m["model_key"]: m for m in await client.models()}
            poses = {p["key"] for p in await client.pose_templates()}
            assert models[MODEL]["credit_cost"] == 1 and "t-pose" in poses
            first = await client.submit(
                astronaut_png(), model_key=MODEL, pose_template_id="t-pose", seed=3
            )
            second = await client.submit(
                io.BytesIO(astronaut_png()), model_key=MODEL, pose_template_id="t-pose", seed=3
            )
            done = await asyncio.gather(
                client.wait(first["id"], timeout=120), client.wait(second["id"], timeout=120)
            )
            image = await client.download(first["id"], 0)
            assert image == await client.download(second["id"], 0)  # same seed, same pixels
            return done[0], done[1], image

    first, second, image = asyncio.run(scenario())
    assert first["status"] == second["status"] == "completed", gpu_worker.tail()
    assert image.startswith(b"\x89PNG")


def test_history_pages_newest_first(live_api, gpu_worker, make_account, sessions):
    account = make_account(credits=10)
    with Client(live_api, account.key) as client:
        ids = [
            client.submit(astronaut_png(), model_key=MODEL, pose_template_id="standing")["id"]
            for _ in range(5)
        ]
        pages = list(client.list(limit=2))
        for job_id in ids:
            client.wait(job_id, timeout=120)
        completed_pages = list(client.list(status="completed", limit=3))
    assert [len(p["items"]) for p in pages] == [2, 2, 1]
    assert [j["id"] for p in pages for j in p["items"]] == ids[::-1]
    assert pages[-1]["next_cursor"] is None
    assert [len(p["items"]) for p in completed_pages] == [3, 2]
    with sessions() as s:
        stored = s.scalar(select(func.count()).where(Generation.user_id == account.user_id))
    assert stored == 5


def test_wait_times_out_with_the_last_state(live_api, make_account):
    # 150 full steps of the tiny SDXL model take far longer than the timeout, whether a worker
    # runs or not (a warm worker runs 110 steps of the SD 1.5 one in about 0.3 s).
    account = make_account(credits=5)
    with Client(live_api, account.key) as client:
        job = client.submit(
            astronaut_png(),
            model_key="tiny-sdxl-openpose",
            pose_template_id="waving",
            num_inference_steps=150,
            strength=1.0,
        )
        started = time.monotonic()
        with pytest.raises(WaitTimeout) as caught:
            client.wait(job["id"], timeout=0.05, poll_interval=0.05)
        assert time.monotonic() - started < 5
        assert caught.value.job["id"] == job["id"]
        assert caught.value.job["status"] in ("queued", "processing")
        with contextlib.suppress(ApiError):  # 409 if it finished meanwhile
            client.cancel(job["id"])
        assert client.wait(job["id"], timeout=60)["status"] in TERMINAL


class Hook:
    """A loopback HTTP server that takes webhooks and keeps their headers and bodies."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                received.append((dict(self.headers.items()), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.requests, "no webhook arrived"


def test_a_delivered_webhook_verifies(live_api, gpu_worker, housekeeping, make_account):
    hook = Hook()
    try:
        account = make_account(credits=5)
        with Client(live_api, account.key) as client:
            secret = client.me()["webhook_secret"]
            job = client.submit(
                astronaut_png(), model_key=MODEL, pose_template_id="waving", webhook_url=hook.url
            )
            assert client.wait(job["id"], timeout=120)["status"] == "completed"
        hook.wait()
        headers, body = hook.requests[0]
        event = verify_webhook(secret, headers, body)
        assert event["type"] == "generation.completed" and event["data"]["id"] == job["id"]
    finally:
        hook.server.shutdown()


def test_events_follow_a_real_job(live_api, gpu_worker, make_account):
    account = make_account(credits=5)
    with Client(live_api, account.key) as client:
        job = client.submit(astronaut_png(), model_key=MODEL, pose_template_id="waving")
        try:
            events = list(client.events(job["id"]))
        except ApiError as exc:
            if exc.status != 404:
                raise
            pytest.skip("this API serves no event stream (GET /v1/generations/{id}/events)")
        ids = [e.id for e in events]
        assert events[-1].event == "completed" and events[-1].job["outputs"], gpu_worker.tail()
        assert "started" in [e.event for e in events] and len(set(ids)) == len(ids)
        # Resumed after the first event: only what came after it.
        rest = list(client.events(job["id"], last_event_id=ids[0]))
    assert rest[-1].event == "completed" and ids[0] not in {e.id for e in rest}
