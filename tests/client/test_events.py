"""`events` and `wait` over Server-Sent Events, against a real HTTP server (uvicorn) that
speaks the contract's stream (`GET /v1/generations/{id}/events`) and breaks it on purpose: a
connection cut mid-stream, a stream that ends early, a 503 on a reconnect. The client must
resume with Last-Event-ID, losing and repeating nothing.

A stand-in for the API's own route, which lives on another branch: tests/client/test_jobs.py
follows a real job's stream once the API serves it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from posegen.client import AsyncClient, Client, StreamLost
from tests.services import free_port

JOB_ID = "3f1c0a6e-0000-4000-8000-000000000001"
NAMES = ["queued", "started", "progress", "progress", "completed"]


def _job(n: int) -> dict:
    status = {"queued": "queued", "completed": "completed"}.get(NAMES[n], "processing")
    return {"id": JOB_ID, "status": status, "progress": {"step": n, "total": 4}, "outputs": []}


class StreamServer:
    """Each connection is answered by the next entry of `plan`: ("events", count) sends that
    many events from where Last-Event-ID says, then either ends ("end") or is cut ("cut");
    ("status", code) answers that status with Retry-After: 1."""

    def __init__(self, plan: list[tuple]) -> None:
        self.plan = list(plan)
        self.last_ids: list[str | None] = []
        self.polls = 0
        app = Starlette(
            routes=[
                Route("/v1/generations/{job_id}/events", self.events),
                Route("/v1/generations/{job_id}", self.poll),
            ]
        )
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    async def poll(self, request: Request) -> Response:
        self.polls += 1
        return JSONResponse(_job(0))

    async def events(self, request: Request) -> Response:
        last = request.headers.get("last-event-id")
        self.last_ids.append(last)
        step = self.plan.pop(0) if self.plan else ("events", len(NAMES), "end")
        if step[0] == "status":
            body = {"error": {"code": "unavailable", "message": "try again"}}
            return JSONResponse(body, status_code=step[1], headers={"Retry-After": "1"})
        _, count, ending = step
        start = int(last) + 1 if last else 0

        async def stream() -> AsyncIterator[bytes]:
            yield b"retry: 50\n: keep-alive\n\n"
            for n in range(start, min(start + count, len(NAMES))):
                data = json.dumps(_job(n))
                yield f"id: {n}\nevent: {NAMES[n]}\ndata: {data}\n\n".encode()
            if ending == "cut":
                raise ConnectionResetError("cut on purpose")  # uvicorn drops the connection

        return StreamingResponse(stream(), media_type="text/event-stream")


@pytest.fixture
def stream_server() -> Iterator[type[StreamServer]]:
    made: list[StreamServer] = []

    def make(plan: list[tuple]) -> StreamServer:
        made.append(StreamServer(plan))
        return made[-1]

    yield make  # type: ignore[misc]
    for server in made:
        server.stop()


BROKEN = [("events", 2, "cut"), ("events", 1, "end"), ("status", 503), ("events", 5, "end")]


def test_a_broken_stream_resumes_from_the_last_event(stream_server):
    server = stream_server(BROKEN)
    with Client(server.url, "pk_test", max_retry_wait=2) as client:
        started = time.monotonic()
        events = list(client.events(JOB_ID))
    assert [(e.id, e.event) for e in events] == [(str(n), name) for n, name in enumerate(NAMES)]
    assert events[-1].terminal and events[-1].job["status"] == "completed"
    # Cut after event 1; ended after 2; a 503 (Retry-After: 1) on the next try; resumed at 2.
    assert server.last_ids == [None, "1", "2", "2"]
    assert time.monotonic() - started >= 1


def test_the_async_client_resumes_the_same_way(stream_server):
    server = stream_server(BROKEN)

    async def collect() -> list:
        async with AsyncClient(server.url, "pk_test", max_retry_wait=2) as client:
            return [e async for e in client.events(JOB_ID)]

    events = asyncio.run(collect())
    assert [e.id for e in events] == ["0", "1", "2", "3", "4"]
    assert server.last_ids == [None, "1", "2", "2"]


def test_a_stream_that_brings_nothing_is_given_up(stream_server):
    server = stream_server([("events", 0, "end")] * 10)
    with Client(server.url, "pk_test", max_retries=2) as client, pytest.raises(StreamLost):
        list(client.events(JOB_ID, last_event_id="1"))
    assert server.last_ids == ["1", "1", "1"]  # the first try and two retries


def test_wait_follows_the_stream_and_polls_once(stream_server):
    server = stream_server([("events", 3, "cut")])
    seen: list[str] = []
    with Client(server.url, "pk_test") as client:
        job = client.wait(JOB_ID, timeout=30, on_update=lambda j: seen.append(j["status"]))
    assert job["status"] == "completed"
    assert server.polls == 1  # the state before the stream, no more
    assert seen == ["queued", "processing", "processing", "processing", "completed"]
