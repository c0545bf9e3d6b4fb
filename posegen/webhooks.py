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
import re
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httpx
import idna
from sqlalchemy import Select, case, exists, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from db.models import Generation, User, WebhookDelivery, new_id, status_is
from db.types import utcnow
from posegen.errors import InvalidRequest
from posegen.queue import DELIVER_WEBHOOK_TASK, WEBHOOK_QUEUE, Message, defer
from posegen.render import render_job
from posegen.settings import Settings

TERMINAL_EVENTS = ("generation.completed", "generation.failed", "generation.canceled")
# What a caller may choose (`webhook_events`), in the order a job sends them; "completed"
# stands for every terminal event.
CHOICES = ("started", "progress", "completed")
DEFAULT_CHOICE = "completed"
PROGRESS = "generation.progress"
MAX_RESPONSE_BYTES = 64 * 1024


class RefusedUrl(InvalidRequest):
    """A webhook URL that is not a plain https URL, or whose host is not a public address."""


# -- SSRF guard -------------------------------------------------------------------------------

# Ranges that `is_global` (which follows the IANA registries) lets through but that reach
# addresses we must not: NAT64 prefixes translate to any IPv4 address, including private ones;
# site-local and IPv4-compatible addresses are deprecated forms that some stacks still route.
_NEVER_PUBLIC = tuple(
    ipaddress.IPv6Network(net) for net in ("64:ff9b::/96", "64:ff9b:1::/48", "fec0::/10", "::/96")
)
# A host whose last label is a number is an IPv4 address in any of inet_aton's spellings
# (0x7f.1, 2130706433, 0177.0.0.1), as browsers read it (WHATWG URL, "ends in a number").
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")
MAX_URL_LENGTH = 2048


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in net for net in _NEVER_PUBLIC):
            return False
        # ::ffff:127.0.0.1 and friends: judge the IPv4 address they carry.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address.teredo:
            embedded = address.teredo[1]
        if embedded is not None:
            return _is_public(embedded)
    # is_global excludes loopback, private, link-local (169.254.169.254 metadata), CGNAT
    # (100.64/10), reserved, multicast-free documentation ranges and unspecified addresses.
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class Target:
    """A webhook URL in the one spelling we store, check and send to."""

    url: str  # ASCII: IDNA host, percent-encoded path and query, no fragment
    host: str  # as it goes into DNS and TLS SNI (an IPv6 literal without brackets)
    port: int


def _ascii_host(parts: SplitResult) -> str:
    host = parts.hostname
    if not host:
        raise RefusedUrl("webhook_url has no host.")
    if parts.netloc.rsplit("@", 1)[-1].startswith("["):
        try:
            return ipaddress.IPv6Address(host).compressed  # refuses zone ids (%eth0) too
        except ValueError:
            raise RefusedUrl("webhook_url has an invalid IPv6 address.") from None
    if not host.isascii():
        try:
            # UTS 46, as browsers and getaddrinfo's own codec map names (full-width letters
            # included), so the name we check is the name that would be looked up.
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise RefusedUrl(f"webhook_url host is not a valid domain name ({exc}).") from None
    if _NUMERIC_LABEL.fullmatch(host.rstrip(".").rsplit(".", 1)[-1]):
        try:
            return socket.inet_ntoa(socket.inet_aton(host.rstrip(".")))
        except OSError:
            raise RefusedUrl("webhook_url has an invalid IPv4 address.") from None
    if not _HOST_NAME.fullmatch(host) or len(host) > 253:
        raise RefusedUrl("webhook_url host is not a valid domain name.")
    return host


def normalise(url: str, *, allow_private: bool) -> Target:
    """Parse a webhook URL strictly and spell it one way; refuse what a sender could not send."""
    if len(url) > MAX_URL_LENGTH:
        raise RefusedUrl(f"webhook_url is longer than {MAX_URL_LENGTH} characters.")
    # Control and format characters, and whitespace of any script: urlsplit would drop some
    # and keep others, and the HTTP client refuses them only when it sends.
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise RefusedUrl("webhook_url contains whitespace or control characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise RefusedUrl("webhook_url is not a valid URL.") from None
    allowed_schemes = {"https", "http"} if allow_private else {"https"}
    if parts.scheme not in allowed_schemes:
        raise RefusedUrl("webhook_url must be an https URL.")
    if "@" in parts.netloc:
        raise RefusedUrl("webhook_url must not carry credentials.")
    if port == 0:
        raise RefusedUrl("webhook_url has port 0.")
    host = _ascii_host(parts)
    try:
        # httpx percent-encodes the path and query as it will when it sends.
        netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
        parsed = httpx.URL(urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")))
    except (httpx.InvalidURL, UnicodeError):
        raise RefusedUrl("webhook_url is not a valid URL.") from None
    normalised = str(parsed)
    if not normalised.isascii() or len(normalised) > MAX_URL_LENGTH:
        raise RefusedUrl("webhook_url is not a valid URL.")
    return Target(url=normalised, host=host, port=port or (443 if parts.scheme == "https" else 80))


def resolve(host: str, port: int) -> list[str]:
    """The addresses a name resolves to (the one DNS lookup of a check)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def resolve_checked(url: str, *, allow_private: bool) -> tuple[Target, list[str]]:
    """Check a webhook URL and return it normalised, with the addresses to connect to."""
    target = normalise(url, allow_private=allow_private)
    try:
        addresses = resolve(target.host, target.port)
    except (OSError, UnicodeError):
        raise RefusedUrl(f"webhook_url host {target.host!r} does not resolve.") from None
    if not allow_private:
        for raw in addresses:
            if not _is_public(ipaddress.ip_address(raw.split("%", 1)[0])):
                raise RefusedUrl(
                    f"webhook_url host {target.host!r} resolves to a non-public address."
                )
    return target, addresses


def check_url(url: str, *, allow_private: bool) -> str:
    """Refuse a URL we would not send to; return the spelling to store (and send to)."""
    target, _ = resolve_checked(url, allow_private=allow_private)
    return target.url


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


# -- the events a job's webhook takes ----------------------------------------------------------


def parse_choices(value: str | None) -> str | None:
    """`webhook_events` as stored: the chosen events in their order, None for the default."""
    if value is None or not value.strip():
        return None
    chosen = {part.strip() for part in value.split(",") if part.strip()}
    unknown = chosen - set(CHOICES)
    if unknown:
        raise InvalidRequest(
            f"Unknown webhook event {sorted(unknown)[0]!r}; choose from {', '.join(CHOICES)}."
        )
    normalised = ",".join(choice for choice in CHOICES if choice in chosen)
    return None if normalised == DEFAULT_CHOICE else normalised


def choices(job: Generation) -> list[str]:
    return (job.webhook_events or DEFAULT_CHOICE).split(",")


def takes(job: Generation, event_type: str) -> bool:
    """Whether the job's webhook takes this event."""
    if not job.webhook_url:
        return False
    kind = event_type.removeprefix("generation.")
    return ("completed" if event_type in TERMINAL_EVENTS else kind) in choices(job)


# -- recording and delivery -------------------------------------------------------------------


def record_event(
    session: Session,
    *,
    job: Generation,
    event_type: str,
    data: dict[str, Any] | None = None,
    seq: int = 0,
) -> WebhookDelivery | None:
    """Record the event for delivery (once per job, type and `seq`: a progress event's step)
    and defer its first attempt; `data` is the job as rendered for the event (rendered here
    when None). Events the job's webhook does not take are not recorded. A progress event
    still waiting for its first attempt is skipped: this later event says more."""
    if not takes(job, event_type):
        return None
    body = {
        "type": event_type,
        "timestamp": utcnow().isoformat().replace("+00:00", "Z"),
        "data": render_job(job) if data is None else data,
    }
    delivery = WebhookDelivery(
        id=new_id(),
        generation_id=job.id,
        user_id=job.user_id,
        event_type=event_type,
        seq=seq,
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
    _skip_unsent_progress(session, generation_id=job.id, but=delivery.id)
    defer(session, deliver_message(delivery.id))
    return delivery


def _skip_unsent_progress(session: Session, *, generation_id: str, but: str) -> None:
    """Progress deliveries of the job never attempted and not held by an attempt now: a
    slow endpoint gets the latest progress, not a backlog of old steps ahead of the end."""
    now = utcnow()
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.generation_id == generation_id,
            WebhookDelivery.event_type == PROGRESS,
            WebhookDelivery.status == "pending",
            WebhookDelivery.attempts == 0,
            WebhookDelivery.next_attempt_at <= now,
            WebhookDelivery.id != but,
        )
        .values(status="skipped", finished_at=now, next_attempt_at=None),
        execution_options={"synchronize_session": False},
    )


def _place(delivery: Any) -> Any:
    """A delivery's place among its job's events: started, progress, then the end (each
    job has one terminal event; its clock may be another machine's), by time within a kind."""
    kind = case(
        (delivery.event_type == "generation.started", 0), (delivery.event_type == PROGRESS, 1),
        else_=2,
    )  # fmt: skip
    return tuple_(kind, delivery.created_at, delivery.seq)


_EARLIER = aliased(WebhookDelivery)
# An earlier delivery of the same job is still pending: this one waits for it.
_WAITS = exists().where(
    _EARLIER.generation_id == WebhookDelivery.generation_id,
    _EARLIER.status == "pending",
    _place(_EARLIER) < _place(WebhookDelivery),
)


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

    @classmethod
    def raised(cls, exc: Exception, *, started: float) -> Attempt:
        """A failed attempt for an exception, `started` being its time.monotonic()."""
        return cls(status_code=None, error=f"{type(exc).__name__}: {exc}", duration_ms=_ms(started))


def claim_delivery(session: Session, *, delivery_id: str, settings: Settings) -> bool:
    """Take a due delivery for one attempt; a second worker or a duplicate message gets False."""
    now = utcnow()
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= now,
            ~_WAITS,
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
            "error": _printable(attempt.error),
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
    if delivery.status != "pending":
        _send_next(session, generation_id=delivery.generation_id)
    return delivery


def _send_next(session: Session, *, generation_id: str) -> None:
    """The job's next delivery, waiting for the one that just ended, is sent now (not at the
    next sweep)."""
    following = session.scalar(
        select(WebhookDelivery.id)
        .where(
            WebhookDelivery.generation_id == generation_id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= utcnow(),
            ~_WAITS,
        )
        .limit(1)
    )
    if following is not None:
        defer(session, deliver_message(following))


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
    msg_id, body = message.msg_id, message.body
    started = time.monotonic()
    try:
        # Stored URLs are normalised at submit; rows from before that are normalised (or
        # refused, as a recorded attempt) here.
        target, addresses = resolve_checked(
            message.url, allow_private=settings.webhook_allow_private
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
    deadline = started + settings.webhook_timeout
    try:
        with (
            httpx.Client(timeout=settings.webhook_timeout, follow_redirects=False) as client,
            client.stream(
                "POST", pinned, content=body, headers=headers, extensions=sni
            ) as response,
        ):
            received = 0
            for chunk in response.iter_bytes():
                received += len(chunk)
                if received > MAX_RESPONSE_BYTES or time.monotonic() > deadline:
                    break
            code = response.status_code
    except httpx.HTTPError as exc:
        return Attempt.raised(exc, started=started)
    if time.monotonic() > deadline:
        return Attempt(status_code=None, error="timeout", duration_ms=_ms(started))
    return Attempt(
        status_code=code,
        error=None if 200 <= code < 300 else f"HTTP {code}",
        duration_ms=_ms(started),
    )


def _printable(error: str | None) -> str | None:
    """An error as the log can hold it: Postgres JSON refuses NUL, and a client shows escapes
    better than raw control characters (an exception may quote the URL it choked on)."""
    if error is None:
        return None
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in error)[:500]


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
