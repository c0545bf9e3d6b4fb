"""Sending webhooks so that one customer's endpoint never delays another's.

A housekeeping worker process hands each delivery (`posegen.deliver_webhook`, an id) to its
`Sender`: an asyncio loop on a thread of its own, where many deliveries are in flight at once
on asynchronous I/O, whatever the worker's concurrency. Each endpoint (scheme, host, port)
has a bound on its deliveries in flight (`POSEGEN_WEBHOOK_ENDPOINT_CONCURRENCY`): the rest
of that endpoint's deliveries wait their turn in the sender without holding anything another
endpoint needs. An endpoint that failed `POSEGEN_WEBHOOK_CIRCUIT_FAILURES` attempts in a row
is paused (its circuit opens): its deliveries are postponed, not attempted, for the retry
schedule's next step (5 s, then 30 s, ...), after which one failure pauses it again for the
step after, and one success closes the circuit. A postponed delivery keeps its attempts.

Each delivery is claimed (`webhooks.claim_delivery`) only once it holds its endpoint's slot,
so the claim's hold covers the attempt, not the wait; a process that dies leaves its claimed
deliveries to beat's sweep, as before. The state (slots, circuits) is per process.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import certifi
import httpx
from sqlalchemy.orm import Session

from posegen import webhooks
from posegen.settings import Settings
from posegen.webhook_urls import RefusedUrl, resolve_checked
from posegen.webhooks import Attempt, Outgoing

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_RESPONSE_BYTES = 64 * 1024

# -- signing ----------------------------------------------------------------------------------


def sign(*, secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(*, secret: str, headers: dict[str, str], body: bytes, tolerance: int = 300) -> bool:
    """What a receiver does (our tests use it too): constant-time check of any v1 signature."""
    msg_id, ts = headers["webhook-id"], int(headers["webhook-timestamp"])
    if abs(time.time() - ts) > tolerance:
        return False
    expected = sign(secret=secret, msg_id=msg_id, timestamp=ts, body=body)
    return any(
        hmac.compare_digest(expected, candidate)
        for candidate in headers["webhook-signature"].split()
    )


# -- one attempt ------------------------------------------------------------------------------

_TLS: list[ssl.SSLContext] = []


def _tls() -> ssl.SSLContext:
    """One TLS context for every attempt (making one loads the CA bundle: milliseconds)."""
    if not _TLS:
        _TLS.append(ssl.create_default_context(cafile=certifi.where()))
    return _TLS[0]


async def post_signed(message: Outgoing, *, settings: Settings) -> Attempt:
    """One POST with a total deadline, no redirects, to an address checked just now."""
    msg_id, body = message.msg_id, message.body
    started = time.monotonic()
    try:
        # Stored URLs are normalised at submit; rows from before that are normalised (or
        # refused, as a recorded attempt) here. The lookup blocks: on a thread.
        target, addresses = await asyncio.to_thread(
            resolve_checked, message.url, allow_private=settings.webhook_allow_private
        )
    except RefusedUrl as exc:
        return Attempt(status_code=None, error=f"refused: {exc.message}", duration_ms=0)
    timestamp = int(time.time())
    url = httpx.URL(target.url)
    headers = {
        "host": url.netloc.decode("ascii"),
        "content-type": "application/json",
        "user-agent": "posegen-webhooks/1",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(
            secret=message.secret, msg_id=msg_id, timestamp=timestamp, body=body
        ),
    }
    # Connect to the address we checked, not to whatever the name resolves to next (DNS
    # rebinding): the URL carries the IP, the Host header and TLS SNI carry the name.
    pinned = url.copy_with(host=addresses[0].split("%", 1)[0], port=target.port)
    sni = {"sni_hostname": target.host}
    client = httpx.AsyncClient(
        timeout=settings.webhook_timeout, follow_redirects=False, verify=_tls()
    )
    try:
        async with asyncio.timeout(settings.webhook_timeout), client:
            request = client.stream("POST", pinned, content=body, headers=headers, extensions=sni)
            async with request as response:
                received = 0
                async for chunk in response.aiter_bytes():
                    received += len(chunk)
                    if received > MAX_RESPONSE_BYTES:
                        break
                code = response.status_code
    except TimeoutError:
        return Attempt(status_code=None, error="timeout", duration_ms=webhooks.elapsed_ms(started))
    except httpx.HTTPError as exc:
        return Attempt.raised(exc, started=started)
    return Attempt(
        status_code=code,
        error=None if 200 <= code < 300 else f"HTTP {code}",
        duration_ms=webhooks.elapsed_ms(started),
    )


# -- endpoints ----------------------------------------------------------------------------------


@dataclass
class Circuit:
    """An endpoint's circuit: open (paused) for the retry schedule's next step once
    `threshold` attempts in a row failed; one success closes it."""

    threshold: int
    schedule: list[float]
    failures: int = 0
    openings: int = 0
    open_until: float = 0.0  # time.monotonic()

    def paused_for(self) -> float:
        """Seconds until the endpoint may be tried again (0: now)."""
        return max(0.0, self.open_until - time.monotonic())

    def record(self, ok: bool) -> None:
        if ok:
            self.failures, self.openings, self.open_until = 0, 0, 0.0
            return
        self.failures += 1
        if self.failures >= self.threshold:
            pause = self.schedule[min(self.openings, len(self.schedule) - 1)]
            self.openings += 1
            self.open_until = time.monotonic() + pause


@dataclass
class Endpoint:
    slots: asyncio.Semaphore
    circuit: Circuit


def endpoint_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"


# -- the sender ---------------------------------------------------------------------------------


class Sender:
    """Delivers webhooks on an asyncio loop of its own; `submit` is called from any thread."""

    def __init__(
        self,
        *,
        unit_of_work: Callable[[], AbstractContextManager[Session]],
        settings: Settings,
        on_attempt: Callable[[Attempt], None] | None = None,
    ) -> None:
        self._unit_of_work = unit_of_work
        self.settings = settings
        self._on_attempt = on_attempt
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._active: set[str] = set()  # submitted, not yet done: a duplicate is dropped
        self._endpoints: dict[str, Endpoint] = {}

    def submit(self, delivery_id: str) -> None:
        asyncio.run_coroutine_threadsafe(self._deliver(delivery_id), self._started())

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                # The database is reached through sync sessions, on these threads.
                loop.set_default_executor(
                    ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook-db")
                )
                threading.Thread(target=loop.run_forever, name="webhooks", daemon=True).start()
                self._loop = loop
            return self._loop

    def _endpoint(self, url: str) -> Endpoint:
        key = endpoint_of(url)
        if key not in self._endpoints:
            s = self.settings
            self._endpoints[key] = Endpoint(
                slots=asyncio.Semaphore(s.webhook_endpoint_concurrency),
                circuit=Circuit(s.webhook_circuit_failures, s.webhook_retry_schedule),
            )
        return self._endpoints[key]

    async def _db(self, call: Callable[..., T], **kwargs: Any) -> T:
        """A domain call in a unit of work of its own (committed, its messages sent)."""

        def run() -> T:
            with self._unit_of_work() as session:
                return call(session, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(None, run)

    async def _deliver(self, delivery_id: str) -> None:
        if delivery_id in self._active:
            return
        self._active.add(delivery_id)
        try:
            url = await self._db(webhooks.due_url, delivery_id=delivery_id)
            if url is not None:
                await self._attempt(delivery_id, self._endpoint(url))
        except Exception:  # the loop goes on; the sweep sends the delivery again
            log.exception("webhook delivery failed", extra={"delivery_id": delivery_id})
        finally:
            self._active.discard(delivery_id)

    async def _attempt(self, delivery_id: str, endpoint: Endpoint) -> None:
        async with endpoint.slots:
            paused = endpoint.circuit.paused_for()
            if paused:
                await self._db(webhooks.postpone, delivery_id=delivery_id, seconds=paused)
                return
            claimed = await self._db(
                webhooks.claim_delivery, delivery_id=delivery_id, settings=self.settings
            )
            if not claimed:
                return
            message = await self._db(webhooks.outgoing, delivery_id=delivery_id)
            started = time.monotonic()
            try:
                attempt = await post_signed(message, settings=self.settings)
            except Exception as exc:
                # An attempt that raised is a failed attempt like any other, recorded and
                # retried on the schedule; unrecorded, the sweep would send it forever.
                log.exception("webhook attempt raised", extra={"delivery_id": delivery_id})
                attempt = Attempt.raised(exc, started=started)
        endpoint.circuit.record(attempt.ok)
        if self._on_attempt is not None:
            self._on_attempt(attempt)
        await self._db(
            webhooks.record_attempt,
            delivery_id=delivery_id,
            attempt=attempt,
            settings=self.settings,
        )


__all__ = ["Circuit", "Sender", "endpoint_of", "post_signed", "sign", "verify"]
