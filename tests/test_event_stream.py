"""GET /v1/generations/{id}/events read by a real HTTP client from a real API process, while
a real Celery worker runs the job: the events, their order and ids, resuming with
Last-Event-ID, keep-alives, the end of the stream, and who may read it."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from httpx_sse import connect_sse

from posegen.events import stream_key
from tests.factories import Account, eventually, submit, wait_for
from tests.processes import start_api

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(base_env: dict[str, str], db_engine: object, process_logs: Path) -> Iterator[str]:
    env = {**base_env, "POSEGEN_STREAM_KEEPALIVE_SECONDS": "0.4"}
    proc, base = start_api(env, process_logs / "stream-api.log")
    yield base
    proc.stop()


@pytest.fixture(scope="module")
def quiet_api(
    base_env: dict[str, str], quiet_broker_url: str, db_engine: object, process_logs: Path
) -> Iterator[str]:
    """An API on a broker no worker listens on: its jobs stay queued."""
    env = {
        **base_env,
        "POSEGEN_BROKER_URL": quiet_broker_url,
        "POSEGEN_STREAM_KEEPALIVE_SECONDS": "0.4",
    }
    proc, base = start_api(env, process_logs / "stream-quiet-api.log")
    yield base
    proc.stop()


@pytest.fixture(scope="module")
def embedded_api(
    base_env: dict[str, str], db_engine: object, process_logs: Path, tmp_path_factory
) -> Iterator[str]:
    """An API on the embedded broker (no Redis, as `posegen demo` runs): streams poll."""
    var = tmp_path_factory.mktemp("embedded")
    env = {**base_env, "POSEGEN_BROKER_URL": "", "POSEGEN_VAR_DIR": str(var)}
    proc, base = start_api(env, process_logs / "stream-embedded-api.log")
    yield base
    proc.stop()


@pytest.fixture
def client(api: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api, timeout=60) as http:
        yield http


def read(client: httpx.Client, account: Account, job_id: str, *, stop_after: int | None = None,
         last_event_id: str | None = None) -> list[tuple[str, str, dict]]:  # fmt: skip
    """(id, event, data) of each event until the server closes the stream (or `stop_after`
    events, then the client closes it)."""
    headers = dict(account.headers)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    seen = []
    url = f"/v1/generations/{job_id}/events"
    with connect_sse(client, "GET", url, headers=headers) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for sse in source.iter_sse():
            if not sse.data:
                # A keep-alive: httpx-sse reports a comment after an id as an event with no
                # data (the spec dispatches nothing for an empty data buffer).
                continue
            seen.append((sse.id, sse.event, json.loads(sse.data)))
            if stop_after is not None and len(seen) == stop_after:
                break
    return seen


def history(broker_url: str, job_id: str) -> list[tuple[str, str, dict]]:
    """The job's events as Redis keeps them."""
    entries = redis.Redis.from_url(broker_url).xrange(stream_key(job_id))
    return [
        (entry_id.decode(), fields[b"event"].decode(), json.loads(fields[b"data"]))
        for entry_id, fields in entries
    ]


def order(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def test_a_stream_follows_a_queued_job_to_its_end(client, make_account, gpu_worker, broker_url):
    account = make_account()
    # The worker runs one job at a time: the job followed waits behind this one.
    blocker = submit(client, account, num_inference_steps=30, strength=1.0).json()
    job = submit(client, account, num_inference_steps=5, strength=1.0).json()
    events = read(client, account, job["id"])

    names = [name for _, name, _ in events]
    assert names == ["queued", "started", *["progress"] * 6, "completed"], (
        names,
        gpu_worker.tail(),
    )
    first = events[0][2]
    assert first["status"] == "queued" and first["queue_position"] in (0, 1)  # blocker started?
    assert [data["progress"]["step"] for _, name, data in events if name == "progress"] == list(
        range(6)
    )
    assert all(data["status"] == "processing" for _, name, data in events[1:-1])
    done = events[-1][2]
    assert done["status"] == "completed" and done["outputs"][0]["url"].endswith("/outputs/0")
    assert done == client.get(f"/v1/generations/{job['id']}", headers=account.headers).json()
    # Ids increase, and are the ids Redis keeps (the first may be the job as it stood before
    # its first event was written).
    ids = [entry_id for entry_id, _, _ in events]
    assert ids == sorted(ids, key=order) and len(set(ids)) == len(ids)
    kept = history(broker_url, job["id"])
    assert [entry_id for entry_id, _, _ in kept][-len(ids) + 1 :] == ids[1:]
    assert [name for _, name, _ in kept] == names
    wait_for(client, account, blocker["id"])


def test_resuming_with_last_event_id_misses_nothing(client, make_account, gpu_worker, broker_url):
    account = make_account()
    blocker = submit(client, account, num_inference_steps=30, strength=1.0).json()
    job = submit(client, account, num_inference_steps=8, strength=1.0).json()
    before = read(client, account, job["id"], stop_after=3)  # queued, started, progress 0
    after = read(client, account, job["id"], last_event_id=before[-1][0])
    assert after[-1][1] == "completed", (after, gpu_worker.tail())
    kept = history(broker_url, job["id"])
    # Together, every event once, in order: from the first one read to the end.
    ids = [entry_id for entry_id, _, _ in before + after]
    kept_ids = [entry_id for entry_id, _, _ in kept]
    assert ids[1:] == kept_ids[kept_ids.index(ids[1]) :]
    assert [name for _, name, _ in before + after][1:] == [name for _, name, _ in kept][1:]
    # Resuming after the end: the end again, and the stream closes.
    again = read(client, account, job["id"], last_event_id=after[-1][0])
    assert [name for _, name, _ in again] == ["completed"]
    wait_for(client, account, blocker["id"])


def test_a_finished_job_streams_its_state_and_closes(client, make_account, gpu_worker):
    account = make_account()
    job = submit(client, account).json()
    done = wait_for(client, account, job["id"])
    events = read(client, account, job["id"])
    assert [(name, data) for _, name, data in events] == [("completed", done)]


def test_keep_alives_then_a_cancel_ends_the_stream(quiet_api, make_account):
    account = make_account()
    lines: list[str] = []
    with httpx.Client(base_url=quiet_api, timeout=30) as client:
        job = submit(client, account).json()
        url = f"/v1/generations/{job['id']}/events"
        with client.stream("GET", url, headers=account.headers) as response:
            for line in response.iter_lines():
                lines.append(line)
                if line == ": keep-alive" and lines.count(line) == 2:
                    cancel = client.post(
                        f"/v1/generations/{job['id']}/cancel", headers=account.headers
                    )
                    assert cancel.status_code == 200
    assert lines[1:3] == ["event: queued", f"data: {json.dumps(job, separators=(',', ':'))}"]
    assert lines[3:6] == ["", ": keep-alive", ""]
    canceled = lines.index("event: canceled")
    assert json.loads(lines[canceled + 1].removeprefix("data: "))["status"] == "canceled"
    assert lines[canceled + 2 :] == [""]  # and the server closed the stream


def test_only_the_owner_reads_a_stream(client, make_account):
    owner, other = make_account(), make_account()
    job = submit(client, owner, pose_template_id="waving").json()
    url = f"/v1/generations/{job['id']}/events"
    assert client.get(url, headers=other.headers).json()["error"]["code"] == "not_found"
    assert client.get(url, headers=other.headers).status_code == 404
    assert client.get(url).status_code == 401
    assert client.get("/v1/generations/not-a-uuid/events", headers=owner.headers).status_code == 404
    client.post(f"/v1/generations/{job['id']}/cancel", headers=owner.headers)


def test_previews_while_a_job_runs(client, make_account, gpu_worker, settings):
    from pathlib import Path

    from PIL import Image

    account = make_account()
    job = submit(client, account, num_inference_steps=12, strength=1.0, preview="true").json()
    assert job["params"]["preview"] is True
    url = f"/v1/generations/{job['id']}/preview"
    fetched = None
    events = []
    with connect_sse(
        client, "GET", f"/v1/generations/{job['id']}/events", headers=account.headers
    ) as source:
        for sse in source.iter_sse():
            if not sse.data:
                continue
            events.append((sse.event, json.loads(sse.data)))
            preview = events[-1][1]["progress"].get("preview_url")
            if preview and fetched is None:
                assert preview == url
                fetched = client.get(preview, headers=account.headers)
    assert fetched is not None, (events, gpu_worker.tail())
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(fetched.content))
    assert image.format == "PNG" and image.size == (16, 16)  # the latents' size at 128 px
    # Linked from the progress after the first preview was stored, and gone with the run.
    progress = [data for name, data in events if name == "progress"]
    assert progress[0]["progress"] == {"step": 0, "total": 12}
    assert events[-1][0] == "completed" and "preview_url" not in events[-1][1]["progress"]
    gone = client.get(url, headers=account.headers)
    assert gone.status_code == 404 and "completed" in gone.json()["error"]["message"]
    storage = Path(settings.storage_url.removeprefix("file://"))
    # The worker removes it just after it records the end, which the stream may tell first.
    stored = storage / "previews" / f"{job['id']}.png"
    assert eventually(lambda: not stored.exists(), timeout=10)
    other = submit(client, account).json()
    assert (
        client.get(f"/v1/generations/{other['id']}/preview", headers=account.headers).status_code
        == 404
    )


def test_without_redis_a_stream_polls_the_database(embedded_api, make_account):
    account = make_account()
    with httpx.Client(base_url=embedded_api, timeout=30) as client:
        job = submit(client, account).json()
        url = f"/v1/generations/{job['id']}/events"
        seen = []
        with connect_sse(client, "GET", url, headers=account.headers) as source:
            for sse in source.iter_sse():
                seen.append((sse.event, json.loads(sse.data)))
                if len(seen) == 1:
                    client.post(f"/v1/generations/{job['id']}/cancel", headers=account.headers)
        assert [name for name, _ in seen] == ["queued", "canceled"]
        assert seen[0][1]["queue_position"] == 0 and seen[1][1]["status"] == "canceled"


def test_a_stream_reads_what_it_missed_while_its_api_lost_redis(
    base_env, quiet_broker_url, db_engine, process_logs, make_account
):
    """The API's link to Redis drops and comes back while a stream is open (the workers still
    reach Redis): the hub subscribes again and the stream reads the events it missed from
    the history. While the link is down, a new stream is refused with 503."""
    import threading
    import time

    from posegen.events import Event, EventLog
    from tests.processes import TcpProxy
    from tests.services import REDIS_PORT

    proxy = TcpProxy(("127.0.0.1", REDIS_PORT))
    proxy.up()
    database = quiet_broker_url.rsplit("/", 1)[1]
    env = {**base_env, "POSEGEN_BROKER_URL": f"redis://127.0.0.1:{proxy.port}/{database}"}
    proc, base = start_api(env, process_logs / "stream-proxied-api.log")
    worker_side = EventLog(quiet_broker_url)  # a worker's view of Redis, not through the proxy
    account = make_account()
    seen: list[tuple[str, dict]] = []
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            job = submit(client, account).json()
            url = f"/v1/generations/{job['id']}/events"

            def read() -> None:
                with connect_sse(client, "GET", url, headers=account.headers) as source:
                    for sse in source.iter_sse():
                        if sse.data:
                            seen.append((sse.event, json.loads(sse.data)))

            reader = threading.Thread(target=read)
            reader.start()
            deadline = time.monotonic() + 10
            while not seen and time.monotonic() < deadline:
                time.sleep(0.05)
            proxy.down()
            missed = {**job, "status": "processing", "progress": {"step": 1, "total": 2}}
            worker_side.publish([Event(job_id=job["id"], name="progress", data=missed)])
            assert worker_side.flush()
            assert client.get(url, headers=account.headers).status_code == 503
            proxy.up()
            while len(seen) < 2 and time.monotonic() < deadline + 20:
                time.sleep(0.05)
            done = {**missed, "status": "completed"}
            worker_side.publish([Event(job_id=job["id"], name="completed", data=done)])
            reader.join(timeout=20)
        assert [name for name, _ in seen] == ["queued", "progress", "completed"], seen
        assert seen[1][1]["progress"] == {"step": 1, "total": 2}
    finally:
        worker_side.close()
        proc.stop()
        proxy.down()
