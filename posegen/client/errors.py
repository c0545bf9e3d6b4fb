"""What the client raises: the API's errors with the contract's code, a wait that ran out, an
event stream that could not be resumed, a webhook that does not verify."""

from __future__ import annotations

import datetime as dt
import email.utils
import math
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from posegen.client.types import Job


class PosegenClientError(Exception):
    """Every error this client raises."""


class ApiError(PosegenClientError):
    """An answer of the API that is not a success: `code` is the contract's
    (`insufficient_credits`, `rate_limited`, ...), `status` the HTTP status, `retry_after`
    the seconds the API asked the caller to wait (429 and 503), else None."""

    def __init__(
        self, *, status: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        code, message = _error_body(response)
        return cls(
            status=response.status_code,
            code=code,
            message=message,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )


class WaitTimeout(PosegenClientError):
    """`wait` gave up before the job finished; `job` is the last state seen."""

    def __init__(self, job: Job, timeout: float) -> None:
        super().__init__(f"job {job.get('id')} still {job.get('status')} after {timeout} s")
        self.job = job


class StreamLost(PosegenClientError):
    """The event stream broke and could not be resumed within the client's retries."""


class WebhookVerificationError(PosegenClientError):
    """A webhook whose headers or signature do not verify with the secret."""


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return float(max(0, math.ceil((when - dt.datetime.now(dt.UTC)).total_seconds())))


def _error_body(response: httpx.Response) -> tuple[str, str]:
    """The contract's `{"error": {"code", "message"}}`; a proxy's page or an empty body is
    described by its status instead."""
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        reason = response.reason_phrase or "error"
        return "http_" + str(response.status_code), f"HTTP {response.status_code} {reason}"
