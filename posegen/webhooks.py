"""Webhooks: events recorded with the job's transition, delivered signed (Standard Webhooks),
retried on a schedule swept by beat, and never sent to an address we did not check.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Select, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import Generation, User, WebhookDelivery, new_id, status_is
from db.types import utcnow
from posegen.errors import InvalidRequest
from posegen.queue import DELIVER_WEBHOOK_TASK, WEBHOOK_QUEUE, Message, defer
from posegen.settings import Settings

EVENTS = ("generation.completed", "generation.failed", "generation.canceled")
MAX_RESPONSE_BYTES = 64 * 1024


class RefusedUrl(InvalidRequest):
    """A webhook URL that is not https, or that resolves to a non-public address."""


# -- SSRF guard -------------------------------------------------------------------------------


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        # ::ffff:127.0.0.1 and friends: judge the IPv4 address they carry.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address.teredo:
            embedded = address.teredo[1]
        if embedded is not None:
            return _is_public(embedded)
    # is_global excludes loopback, private, link-local (169.254.169.254 metadata), CGNAT
    # (100.64/10), reserved, multicast-free documentation ranges and unspecified addresses.
    return address.is_global and not address.is_multicast


def resolve_checked(url: str, *, allow_private: bool) -> tuple[str, int, list[str]]:
    """Check a webhook URL and return (host, port, addresses to connect to)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise RefusedUrl("webhook_url is not a valid URL.") from None
    allowed_schemes = {"https", "http"} if allow_private else {"https"}
    if parts.scheme not in allowed_schemes:
        raise RefusedUrl("webhook_url must be an https URL.")
    host = parts.hostname
    if not host:
        raise RefusedUrl("webhook_url has no host.")
    if parts.username or parts.password:
        raise RefusedUrl("webhook_url must not carry credentials.")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise RefusedUrl(f"webhook_url host {host!r} does not resolve.") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    if not allow_private:
        for raw in addresses:
            if not _is_public(ipaddress.ip_address(raw.split("%", 1)[0])):
                raise RefusedUrl(f"webhook_url host {host!r} resolves to a non-public address.")
    return host, port, addresses


def check_url(url: str, *, allow_private: bool) -> None:
    if len(url) > 2048:
        raise RefusedUrl("webhook_url is longer than 2048 characters.")
    resolve_checked(url, allow_private=allow_private)


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


# -- recording and delivery -------------------------------------------------------------------


def record_event(session: Session, *, job: Generation, event_type: str) -> WebhookDelivery | None:
    """Record the event for delivery (once per job and type) and defer its first attempt."""
    if not job.webhook_url:
        return None
    from posegen.jobs import render_job

    body = {
        "type": event_type,
        "timestamp": utcnow().isoformat().replace("+00:00", "Z"),
        "data": render_job(job),
    }
    delivery = WebhookDelivery(
        id=new_id(),
        generation_id=job.id,
        user_id=job.user_id,
        event_type=event_type,
        url=job.webhook_url,
        payload=json.dumps(body, separators=(",", ":")),
        status="pending",
        attempts=0,
        attempt_log=[],
        next_attempt_at=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(delivery)
            session.flush()
    except IntegrityError:
        return None  # recorded already by an earlier run of the same transition
    defer(session, deliver_message(delivery.id))
    return delivery


def deliver_message(delivery_id: str) -> Message:
    return Message(task=DELIVER_WEBHOOK_TASK, args=(delivery_id,), queue=WEBHOOK_QUEUE)


@dataclass(frozen=True)
class Attempt:
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def claim_delivery(session: Session, *, delivery_id: str, settings: Settings) -> bool:
    """Take a due delivery for one attempt; a second worker or a duplicate message gets False."""
    now = utcnow()
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= now,
        )
        # Hold it for the attempt's deadline (and some): a crash mid-attempt retries later.
        .values(next_attempt_at=now + dt.timedelta(seconds=settings.webhook_timeout * 3))
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Outgoing:
    url: str
    msg_id: str
    secret: str
    body: bytes


def outgoing(session: Session, *, delivery_id: str) -> Outgoing:
    delivery = session.get_one(WebhookDelivery, delivery_id)
    user = session.get_one(User, delivery.user_id)
    return Outgoing(
        url=delivery.url,
        msg_id=delivery.id,
        secret=user.webhook_secret,
        body=delivery.payload.encode(),
    )


def record_attempt(
    session: Session, *, delivery_id: str, attempt: Attempt, settings: Settings
) -> WebhookDelivery:
    delivery = session.get_one(WebhookDelivery, delivery_id)
    now = utcnow()
    delivery.attempts += 1
    delivery.attempt_log = [
        *delivery.attempt_log,
        {
            "at": now.isoformat(),
            "status_code": attempt.status_code,
            "error": attempt.error,
            "duration_ms": attempt.duration_ms,
        },
    ]
    schedule = settings.webhook_retry_schedule
    if attempt.ok:
        delivery.status, delivery.finished_at, delivery.next_attempt_at = "delivered", now, None
    elif attempt.status_code == 410 or delivery.attempts > len(schedule):
        # 410 Gone: the receiver says stop. Otherwise the schedule is spent.
        delivery.status, delivery.finished_at, delivery.next_attempt_at = "failed", now, None
    else:
        delay = schedule[delivery.attempts - 1]
        delivery.next_attempt_at = now + dt.timedelta(seconds=delay)
    session.flush()
    return delivery


def due_query(now: dt.datetime, limit: int) -> Select[str]:
    """Pending deliveries whose next attempt is due, oldest first (ix_webhook_deliveries_due)."""
    return (
        select(WebhookDelivery.id)
        .where(status_is(WebhookDelivery.status, "pending"), WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    )


def due_deliveries(session: Session, *, limit: int = 500) -> list[str]:
    return list(session.scalars(due_query(utcnow(), limit)))


def post_signed(message: Outgoing, *, settings: Settings) -> Attempt:
    """One POST with a total deadline, no redirects, to an address checked just now."""
    url, msg_id, body = message.url, message.msg_id, message.body
    started = time.monotonic()
    try:
        host, port, addresses = resolve_checked(url, allow_private=settings.webhook_allow_private)
    except RefusedUrl as exc:
        return Attempt(status_code=None, error=f"refused: {exc.message}", duration_ms=0)
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "posegen-webhooks/1",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(
            secret=message.secret, msg_id=msg_id, timestamp=timestamp, body=body
        ),
    }
    parts = urlsplit(url)
    # Connect to the address we checked, not to whatever the name resolves to next (DNS
    # rebinding): the URL carries the IP, the Host header and TLS SNI carry the name.
    ip = addresses[0]
    netloc_ip = f"[{ip}]" if ":" in ip else ip
    pinned = parts._replace(netloc=f"{netloc_ip}:{port}").geturl()
    headers["host"] = parts.netloc.rsplit("@", 1)[-1]
    deadline = started + settings.webhook_timeout
    try:
        with (
            httpx.Client(timeout=settings.webhook_timeout, follow_redirects=False) as client,
            client.stream(
                "POST", pinned, content=body, headers=headers, extensions={"sni_hostname": host}
            ) as response,
        ):
            received = 0
            for chunk in response.iter_bytes():
                received += len(chunk)
                if received > MAX_RESPONSE_BYTES or time.monotonic() > deadline:
                    break
            code = response.status_code
    except httpx.HTTPError as exc:
        return Attempt(
            status_code=None, error=f"{type(exc).__name__}: {exc}"[:500], duration_ms=_ms(started)
        )
    if time.monotonic() > deadline:
        return Attempt(status_code=None, error="timeout", duration_ms=_ms(started))
    return Attempt(
        status_code=code,
        error=None if 200 <= code < 300 else f"HTTP {code}",
        duration_ms=_ms(started),
    )


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def deliveries_for(session: Session, generation_id: str) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.generation_id == generation_id)
    )
    return [
        {"id": d.id, "event_type": d.event_type, "status": d.status, "attempts": d.attempt_log}
        for d in rows
    ]
