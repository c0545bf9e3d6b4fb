"""The webhook events a caller chooses (`webhook_events`): which arrive, in what order, how
often progress is sent, and that an event waits for the earlier events of its job."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import time

import pytest
from sqlalchemy import select

from db.models import WebhookDelivery
from tests.factories import submit, wait_for

pytestmark = pytest.mark.slow
LONG = {"num_inference_steps": 16, "strength": 1.0}


def events_of(hook) -> list[dict]:
    return [json.loads(body) for _, body in hook.requests]


def deliveries(sessions, job_id: str) -> list[WebhookDelivery]:
    with sessions() as s:
        return list(
            s.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.generation_id == job_id)
                .order_by(WebhookDelivery.created_at)
            )
        )


def test_started_progress_and_completed_arrive_in_order(
    app, make_account, gpu_worker, housekeeping, receiver, sessions, settings
):
    hook = receiver()
    account = make_account()
    job = submit(
        app, account, webhook_url=hook.url, webhook_events="completed, progress,started", **LONG
    ).json()
    assert job["webhook_events"] == ["started", "progress", "completed"]
    assert wait_for(app, account, job["id"])["status"] == "completed", gpu_worker.tail()
    deadline = time.monotonic() + 30
    while "generation.completed" not in [e["type"] for e in events_of(hook)]:
        assert time.monotonic() < deadline, events_of(hook)
        time.sleep(0.05)
    rows = deliveries(sessions, job["id"])
    while any(r.status == "pending" for r in rows):
        assert time.monotonic() < deadline, [(r.event_type, r.status) for r in rows]
        time.sleep(0.05)  # the last attempt's outcome is recorded after its answer
        rows = deliveries(sessions, job["id"])
    sent = events_of(hook)
    types = [event["type"] for event in sent]
    assert types[0] == "generation.started" and types[-1] == "generation.completed", types
    progress = sent[1:-1]
    assert progress and {event["type"] for event in progress} == {"generation.progress"}, types
    steps = [event["data"]["progress"]["step"] for event in progress]
    assert steps == sorted(set(steps)) and all(0 < step <= 16 for step in steps)
    assert all(event["data"]["progress"]["total"] == 16 for event in progress)
    # Recorded at most once per POSEGEN_WEBHOOK_PROGRESS_INTERVAL.
    made = [r.created_at for r in rows if r.event_type == "generation.progress"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(made)]
    interval = dt.timedelta(seconds=settings.webhook_progress_interval)
    assert all(gap >= interval * 0.95 for gap in gaps), gaps
    assert {r.status for r in rows} <= {"delivered", "skipped"}


def test_the_default_is_the_terminal_event_alone(
    app, make_account, gpu_worker, housekeeping, receiver, sessions
):
    hook = receiver()
    account = make_account()
    job = submit(app, account, webhook_url=hook.url, **LONG).json()
    assert job["webhook_events"] == ["completed"]
    wait_for(app, account, job["id"])
    hook.wait(1)
    assert [event["type"] for event in events_of(hook)] == ["generation.completed"]
    assert [r.event_type for r in deliveries(sessions, job["id"])] == ["generation.completed"]


def test_the_end_waits_for_an_earlier_event_being_retried(
    app, make_account, gpu_worker, housekeeping, receiver, sessions
):
    hook = receiver([500, 500])  # the first two attempts fail: those of `started`
    account = make_account()
    job = submit(app, account, webhook_url=hook.url, webhook_events="started,completed").json()
    assert wait_for(app, account, job["id"])["status"] == "completed"
    hook.wait(4)
    types = [event["type"] for event in events_of(hook)]
    assert types == ["generation.started"] * 3 + ["generation.completed"]
    deadline = time.monotonic() + 10
    while [r.status for r in deliveries(sessions, job["id"])] != ["delivered", "delivered"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"webhook_events": "started,finished"}, "Unknown webhook event 'finished'"),
        ({"webhook_events": "started"}, "webhook_events needs a webhook_url"),
    ],
)
def test_refused_choices(app, make_account, fields, message):
    account = make_account()
    if "finished" in fields["webhook_events"]:
        fields = {**fields, "webhook_url": "http://127.0.0.1:9/hook"}
    answer = submit(app, account, **fields)
    assert answer.status_code == 422 and message in answer.json()["error"]["message"]
