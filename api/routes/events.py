"""GET /v1/generations/{id}/events: a job's events as server-sent events, until it ends.

Each event is named as its job's change (`queued`, `started`, `progress`, `completed`,
`failed`, `canceled`), carries the job object as its `data` and an `id`. A stream opens with
the job as it stands (read from the database, the caller's key checked in the same query:
`api.poll`), then follows it live through this process's `EventHub`, and ends after a
terminal event. A client that reconnects with `Last-Event-ID` gets every event after that id
(or, where those are no longer kept, the job as it stands first).

The route is `async` and holds no thread and no database connection while it waits: a
process holds a thousand open streams (`python -m bench.stream`). Without Redis (the
embedded demo) there is no hub, and a stream reads the job from the database twice a second.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.event_hub import RESYNC, Entry, EventHub, Inbox, entry_order
from api.openapi import documented
from api.poll import poll
from db.fast import AsyncReads
from posegen import catalog
from posegen.errors import NotFound, Unavailable
from posegen.events import NAMES, TERMINAL

router = APIRouter(prefix="/v1/generations", tags=["generations"])
POLL_SECONDS = 0.5
# The id of the job as it stands when the job has no event kept (any real id is after it).
ORIGIN = "0-0"
# One event of the stream (in OpenAPI 3.1 a stream's `schema` describes each of its events):
# its name, its id and the job as JSON in `data`.
EVENT = {
    "type": "object",
    "properties": {
        "event": {"enum": list(NAMES)},
        "id": {"type": "string"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/Job"},
        },
    },
    "required": ["event", "id", "data"],
}


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": EVENT}},
            "description": "The job's events (server-sent events), until its terminal one.",
        },
        **documented(401, 404, 422, 503),
    },
)
async def generation_events(
    request: Request,
    job_id: str,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> EventSourceResponse:
    """The job's events as `text/event-stream`, until a terminal one."""
    state = request.app.state
    authorization = request.headers.get("authorization")
    hub: EventHub | None = state.event_hub
    if hub is None:
        job = await poll(state.async_reads, authorization=authorization, job_id=job_id)
        events = _polled(state.async_reads, authorization=authorization, job=job)
    else:
        events = await _followed(
            hub, state.async_reads, authorization=authorization, job_id=job_id,
            after=_valid(last_event_id),
        )  # fmt: skip
    return EventSourceResponse(
        events,
        ping=state.settings.stream_keepalive_seconds,
        ping_message_factory=lambda: ServerSentEvent(comment="keep-alive"),
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def _valid(last_event_id: str | None) -> str | None:
    """The Last-Event-ID if it is one of ours, else None (the stream starts afresh)."""
    if last_event_id is None:
        return None
    try:
        entry_order(last_event_id)
    except ValueError:
        return None
    return last_event_id


def name_of(job: dict[str, Any]) -> str:
    """The event that tells a job as it stands."""
    status = str(job["status"])
    if status == "processing":
        return "progress" if job["progress"]["step"] else "started"
    return status


async def _followed(
    hub: EventHub, reads: AsyncReads, *, authorization: str | None, job_id: str, after: str | None
) -> AsyncIterator[ServerSentEvent]:
    """Subscribe, read where the history stands, then the job (which checks the key and the
    owner: 401 and 404 are answered before the stream starts); the events follow."""
    if not catalog.is_uuid(job_id):
        raise NotFound(f"No generation {job_id!r}.")
    try:
        inbox = await hub.subscribe(job_id)
    except (RedisError, OSError, TimeoutError) as error:
        raise Unavailable("Live events are unavailable (Redis); retry shortly.") from error
    try:
        start = await hub.last_id(job_id) or ORIGIN
        history = await hub.history(job_id, after) if after is not None else None
        job = await poll(reads, authorization=authorization, job_id=job_id)
    except (RedisError, OSError) as error:
        await hub.unsubscribe(inbox)
        raise Unavailable("Live events are unavailable (Redis); retry shortly.") from error
    except BaseException:
        await hub.unsubscribe(inbox)
        raise
    return _events(hub, inbox, job_id=job_id, job=job, start=start, history=history, after=after)


async def _events(
    hub: EventHub,
    inbox: Inbox,
    *,
    job_id: str,
    job: dict[str, Any],
    start: str,
    history: list[Entry] | None,
    after: str | None,
) -> AsyncIterator[ServerSentEvent]:
    try:
        snapshot = Entry(start, name_of(job), json.dumps(job, separators=(",", ":")))
        if history is None or after is None:
            # A new stream, or what it missed is gone: the job as it stands.
            history, last = [snapshot], ORIGIN
        elif job["status"] in TERMINAL and not any(e.name in TERMINAL for e in history):
            # Resumed after the end (or before its event was written): the end, again.
            for entry in history:
                yield ServerSentEvent(data=entry.data, event=entry.name, id=entry.id)
            ident = history[-1].id if history else after
            yield ServerSentEvent(data=snapshot.data, event=snapshot.name, id=ident)
            return
        else:
            last = after
        while True:
            for entry in history:
                if last != ORIGIN and entry_order(entry.id) <= entry_order(last):
                    continue  # seen: sent by both the history and the subscription
                yield ServerSentEvent(data=entry.data, event=entry.name, id=entry.id)
                last = entry.id
                if entry.name in TERMINAL:
                    return
            item = await inbox.queue.get()
            # RESYNC: the hub reconnected; what it missed is read from the history.
            history = [item] if item is not RESYNC else await hub.history(job_id, last) or []
    finally:
        await hub.unsubscribe(inbox)


async def _polled(
    reads: AsyncReads, *, authorization: str | None, job: dict[str, Any]
) -> AsyncIterator[ServerSentEvent]:
    """Without Redis: the job read again every POLL_SECONDS, an event when it changed."""
    shown: tuple[Any, ...] | None = None
    while True:
        seen = (job["status"], job["progress"]["step"], job["queue_position"])
        if seen != shown:
            shown = seen
            ident = f"{time.time_ns() // 1_000_000}-0"
            data = json.dumps(job, separators=(",", ":"))
            yield ServerSentEvent(data=data, event=name_of(job), id=ident)
        if job["status"] in TERMINAL:
            return
        await asyncio.sleep(POLL_SECONDS)
        job = await poll(reads, authorization=authorization, job_id=str(job["id"]))
