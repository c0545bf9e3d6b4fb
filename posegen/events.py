"""A job's live events: one vocabulary (queued, started, progress, completed, failed,
canceled), each carrying the job object, for the event stream (`GET .../events`).

Where Redis is the broker, every event of a job is appended to a Redis stream of its own
(its entry id is the SSE `id:`, so a client resuming with `Last-Event-ID` reads on from
there) and published on a channel of the same name, which each API process follows with one
subscription (`api.event_hub`). A transition's event is recorded in its session and sent once
the boundary commits (`posegen.queue.Dispatcher`), as a deferred message is: an event never
tells of a state that rolled back. A worker's progress is not a transition and goes out as it
happens (`EventLog.publish`).

Events are sent by a thread of their own, in the order given: neither a step of the model nor
a request waits on Redis, and a job's progress never overtakes its terminal event from the
same process. Redis unreachable: the events are dropped (logged); the database stays the
truth, and a stream that (re)connects starts from the job as the database has it."""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from db.models import Generation
    from posegen.settings import Settings

log = logging.getLogger(__name__)

NAMES = ("queued", "started", "progress", "completed", "failed", "canceled")
TERMINAL = frozenset(("completed", "failed", "canceled"))

# A job's events are kept, at most about this many (approximate trimming is cheaper): more
# than a job sends (progress once per step, at most 150 steps an attempt, a few attempts).
STREAM_MAXLEN = 2000
# How long a job's events are kept after its last one: long enough for any client to come
# back; a stream asked for later starts from the database's state.
LIVE_TTL_SECONDS = 24 * 3600
ENDED_TTL_SECONDS = 3600

# One round trip appends the event and publishes it with the id the stream gave it, so a
# subscriber sees the same id as a client reading the stream's history.
_APPEND = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                      'event', ARGV[2], 'data', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', KEYS[1], id .. '\\n' .. ARGV[2] .. '\\n' .. ARGV[3])
return id
"""


def stream_key(job_id: str) -> str:
    """The Redis stream that holds a job's events, and the channel they are published on."""
    return f"posegen:events:{job_id}"


def redis_url(settings: Settings) -> str | None:
    """Where events go: the broker's Redis; None with the embedded broker (no events: the
    stream polls the database)."""
    url = settings.broker_url
    return url if url.startswith(("redis://", "rediss://", "unix://")) else None


@dataclass(frozen=True)
class Event:
    job_id: str
    name: str
    data: dict[str, Any]

    @property
    def payload(self) -> str:
        return json.dumps(self.data, separators=(",", ":"))


def record(session: Session, event: Event) -> None:
    """Send `event` once this session's transaction commits (dropped with a rollback)."""
    session.info.setdefault("events", []).append(event)


def recorded(session: Session) -> list[Event]:
    """The events recorded in this session since the last call (they are taken)."""
    events: list[Event] = session.info.pop("events", [])
    return events


class EventLog:
    """Appends events to the jobs' Redis streams, on a thread of its own (started on first
    use, in the process that uses it: never across a fork)."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._append = self._client.register_script(_APPEND)
        self._queue: queue.SimpleQueue[list[Event] | threading.Event | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def publish(self, events: list[Event]) -> None:
        if events:
            self._started()
            self._queue.put(events)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until what was published before this call is sent (or dropped)."""
        done = threading.Event()
        self._started()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
        self._client.close()

    def _started(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="event-log", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[Event] = []
            # Whatever else is waiting goes out in the same round trip.
            while item is not None:
                if isinstance(item, threading.Event):
                    self._send(batch)
                    batch = []
                    item.set()
                else:
                    batch += item
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._send(batch)
            if item is None:
                return

    def _send(self, batch: list[Event]) -> None:
        if not batch:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for event in batch:
                ttl = ENDED_TTL_SECONDS if event.name in TERMINAL else LIVE_TTL_SECONDS
                args: list[str | int] = [STREAM_MAXLEN, event.name, event.payload, ttl]
                self._append(keys=[stream_key(event.job_id)], args=args, client=pipe)
            pipe.execute()
        except redis.RedisError as error:
            log.warning("job events not sent: %s", error, extra={"events": len(batch)})


def event_log(settings: Settings) -> EventLog | None:
    url = redis_url(settings)
    return EventLog(url) if url else None


def job_event(session: Session, job: Generation, name: str, **render: Any) -> Event:
    """Record the event `name` of `job` as it stands (rendered now, sent at the commit)."""
    from posegen.render import render_job

    event = Event(job_id=job.id, name=name, data=render_job(job, **render))
    record(session, event)
    return event


def progress(job: Generation, *, step: int, total: int, **extra: Any) -> Event:
    """A running job's `progress` event: the job as claimed, at this step (sent as it
    happens, not through a transaction: `EventLog.publish`)."""
    from posegen.render import render_job

    data = render_job(job)
    data["progress"] = {"step": step, "total": total, **extra}
    return Event(job_id=job.id, name="progress", data=data)
