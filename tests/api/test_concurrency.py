"""Many more concurrent clients than the API has threads and pooled connections (real server)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import update

from db.models import Generation
from posegen.storage import storage_from_settings
from tests.factories import png_bytes
from tests.processes import start_api
from tests.services import settings_from


def test_more_clients_than_threads_and_connections(base_env, db_engine, process_logs, make_account, sessions):  # fmt: skip
    """2 threads and 6 pooled connections, 40 clients at once on every kind of route. A request
    that held a connection while it waited for a thread (and threads that waited for those
    connections) used to stall the API until the pool timed out (30 s), then answer 503."""
    env = {**base_env, "POSEGEN_API_THREADS": "2"}
    proc, base = start_api(env, process_logs / "api-2-threads.log")
    try:
        account = make_account(credits=100)
        form = {"model_key": "tiny-sd15-openpose", "pose_template_id": "standing"}
        image = png_bytes()
        files = {"image": ("p.png", image, "image/png")}
        done = httpx.post(f"{base}/v1/generations", headers=account.headers, data=form, files=files)  # fmt: skip
        job_id = done.json()["id"]
        # Make it a finished job with an output on disk, for the download route.
        key = f"outputs/{job_id}/0.png"
        storage_from_settings(settings_from(base_env)).put(key, image)
        output = {"index": 0, "key": key, "width": 96, "height": 128}
        with sessions() as s:  # type: ignore[operator]
            finish = update(Generation).where(Generation.id == job_id)
            s.execute(finish.values(status="completed", outputs=[output]))
            s.commit()

        def one(i: int) -> httpx.Response:
            with httpx.Client(base_url=base, headers=account.headers, timeout=20) as client:
                kind = i % 5
                if kind == 0:
                    return client.post("/v1/generations", data=form, files=files)
                if kind == 1:
                    return client.get(f"/v1/generations/{job_id}")
                if kind == 2:
                    return client.get(f"/v1/generations/{job_id}/outputs/0")
                if kind == 3:
                    return client.get("/v1/generations")
                return client.get("/v1/me")

        with ThreadPoolExecutor(max_workers=40) as pool:
            responses = list(pool.map(one, range(200)))
        odd = [(r.request.url.path, r.status_code, r.text[:200]) for r in responses if r.status_code not in (200, 202)]  # fmt: skip
        assert not odd, (odd[:5], proc.tail())
        assert [r.status_code for r in responses].count(202) == 40
        assert all(r.content == image for r in responses[2::5])
    finally:
        proc.stop()
