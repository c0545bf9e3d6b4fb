"""The jobs' live events as this API process receives them: one Redis subscription for the
whole process, fanned out to the event streams it serves (`api.routes.events`).

A stream subscribes to its job's channel (`posegen.events.stream_key`) here; the hub sends
Redis one SUBSCRIBE for the first stream of a job and one UNSUBSCRIBE after its last, on its
one connection, and hands each message to every stream of that job. The history (what a
stream that starts or resumes has to catch up on) is read from the job's Redis stream.

The order that loses nothing: subscribe (and wait for Redis to confirm it), then read the
history; what arrives both ways is told apart by its id. When the connection drops, Redis
forgets the subscriptions: redis-py subscribes again as it reconnects, and every stream is
told to read the history it missed since its last id (`RESYNC`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from posegen.events import redis_url, stream_key
from posegen.settings import Settings

log = logging.getLogger(__name__)

# What a stream's inbox holds: an entry, or RESYNC (read the history since your last id).
RESYNC = None
CONFIRM_TIMEOUT = 5.0


@dataclass(frozen=True)
class Entry:
    id: str  # the Redis stream entry id, "<ms>-<seq>": the SSE `id:`
    name: str
    data: str  # the job object, JSON


def entry_order(entry_id: str) -> tuple[int, int]:
    """An entry id as something to compare; ValueError for what is not one."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Inbox:
    """One stream's queue of entries from the hub."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.queue: asyncio.Queue[Entry | None] = asyncio.Queue()


class EventHub:
    def __init__(self, url: str) -> None:
        # History reads share a few connections: a thousand streams starting at once do not
        # open a thousand.
        self._reads = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                url, max_connections=16, timeout=10, socket_timeout=5, socket_connect_timeout=5
            )
        )
        self._pubsub = aioredis.Redis.from_url(url, socket_connect_timeout=5).pubsub()
        self._inboxes: dict[str, set[Inbox]] = {}
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._stale: set[str] = set()  # subscribed again after a reconnect, not yet confirmed
        self._reader: asyncio.Task[None] | None = None
        self._watched: object = None  # the connection whose reconnects are watched
        # One (UN)SUBSCRIBE sent at a time on the one connection: a thousand streams starting
        # at once would otherwise each open a connection of their own for the first.
        self._commands = asyncio.Lock()

    @classmethod
    def for_settings(cls, settings: Settings) -> EventHub | None:
        """The hub on the broker's Redis; None with the embedded broker (streams poll)."""
        url = redis_url(settings)
        return cls(url) if url else None

    # -- subscriptions ------------------------------------------------------------------------

    async def subscribe(self, job_id: str) -> Inbox:
        """An inbox for the job's events, once Redis has confirmed the subscription."""
        channel = stream_key(job_id)
        inbox = Inbox(channel)
        inboxes = self._inboxes.setdefault(channel, set())
        inboxes.add(inbox)
        try:
            if len(inboxes) == 1:
                self._confirmed[channel] = asyncio.get_running_loop().create_future()
                async with self._commands:
                    await self._pubsub.subscribe(channel)
                self._start_reader()
            confirmed = self._confirmed[channel]
            await asyncio.wait_for(asyncio.shield(confirmed), CONFIRM_TIMEOUT)
        except BaseException:
            await self.unsubscribe(inbox)
            raise
        return inbox

    async def unsubscribe(self, inbox: Inbox) -> None:
        inboxes = self._inboxes.get(inbox.channel)
        if inboxes is None:
            return
        inboxes.discard(inbox)
        if inboxes:
            return
        del self._inboxes[inbox.channel]
        self._confirmed.pop(inbox.channel, None)
        with contextlib.suppress(RedisError, OSError):
            async with self._commands:
                if inbox.channel not in self._inboxes:  # no stream of the job came meanwhile
                    await self._pubsub.unsubscribe(inbox.channel)

    @property
    def streams(self) -> int:
        return sum(len(inboxes) for inboxes in self._inboxes.values())

    # -- history ------------------------------------------------------------------------------

    async def last_id(self, job_id: str) -> str | None:
        """The id of the job's latest event, None when it has none (yet, or any more)."""
        entries = await self._reads.xrevrange(stream_key(job_id), count=1)
        return _text(entries[0][0]) if entries else None

    async def history(self, job_id: str, after: str) -> list[Entry] | None:
        """The job's events after the id `after`; None when they are not all there to read
        (no events kept, or the oldest kept is newer than `after`)."""
        key = stream_key(job_id)
        async with self._reads.pipeline(transaction=False) as pipe:
            pipe.xrange(key, count=1)
            pipe.xrange(key, min=f"({after}")
            first, entries = await pipe.execute()
        if not first or entry_order(first[0][0].decode()) > entry_order(after):
            return None
        return [_entry(entry_id, fields) for entry_id, fields in entries]

    # -- the reader ---------------------------------------------------------------------------

    def _start_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read(), name="event-hub")

    async def _read(self) -> None:
        while self._inboxes:
            try:
                self._watch_reconnects()
                message = await self._pubsub.get_message(timeout=None)
            except (RedisError, OSError) as error:
                log.warning("event hub: Redis unreachable (%s); retrying", error)
                await asyncio.sleep(0.5)
                continue
            if message is not None:
                self._dispatch(message)

    def _watch_reconnects(self) -> None:
        # Registered once connected: every later call is a reconnect.
        conn = self._pubsub.connection
        if conn is not None and conn is not self._watched:
            self._watched = conn
            conn.register_connect_callback(self._reconnected)

    async def _reconnected(self, _: Any) -> None:
        # Called after redis-py has sent the SUBSCRIBEs again: what was published meanwhile
        # is lost to this connection, and each stream reads it from the history once its
        # subscription is confirmed again.
        self._stale.update(self._inboxes)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, raw = message["type"], message.get("channel")
        if not isinstance(raw, bytes):
            return
        channel = raw.decode()
        if kind == "message":
            entry_id, name, data = message["data"].decode().split("\n", 2)
            entry = Entry(entry_id, name, data)
            for inbox in self._inboxes.get(channel, ()):
                inbox.queue.put_nowait(entry)
        elif kind == "subscribe":
            confirmed = self._confirmed.get(channel)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
            if channel in self._stale:
                self._stale.discard(channel)
                for inbox in self._inboxes.get(channel, ()):
                    inbox.queue.put_nowait(RESYNC)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await self._reader
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()
        await self._reads.aclose()


def _entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Entry:
    return Entry(entry_id.decode(), fields[b"event"].decode(), fields[b"data"].decode())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
