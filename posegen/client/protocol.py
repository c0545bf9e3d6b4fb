"""What the sync and async clients share: how each call is put on the wire, how answers are
read, and when a call is tried again. The clients only send and wait."""

from __future__ import annotations

import json
import mimetypes
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypedDict, Unpack
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent
from tenacity import (
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from posegen.client.errors import ApiError
from posegen.client.types import Event, Job

# A path, the bytes, or an open binary file.
ImageInput = str | os.PathLike[str] | bytes | IO[bytes]

# Refused with these, a request was not carried out (rate limit, queue full, overloaded, a
# dependency down: nothing charged), so it can be sent again.
RETRIED_STATUSES = frozenset({429, 503})


class SubmitFields(TypedDict, total=False):
    """The submit's form fields besides the photo and the model (CONTRACT.md, "Submit");
    None is the same as leaving a field out."""

    prompt: str | None
    negative_prompt: str | None
    pose_template_id: str | None
    num_inference_steps: int | None
    guidance_scale: float | None
    controlnet_conditioning_scale: float | None
    strength: float | None
    seed: int | None
    webhook_url: str | None
    webhook_events: str | list[str] | None
    preview: bool | None
    output_format: str | None
    output_quality: int | None
    num_outputs: int | None
    deadline_seconds: int | None


SUBMIT_FIELDS = frozenset(SubmitFields.__annotations__)


@dataclass(frozen=True)
class Call:
    """One request, as `httpx.Client.request` takes it."""

    method: str
    path: str
    params: dict[str, str | int] | None = None
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "data": self.data,
            "files": self.files,
            "headers": self.headers,
        }


def job_path(job_id: str, *rest: str) -> str:
    return "/".join(["/v1/generations", quote(job_id, safe=""), *rest])


def submit_call(
    image: ImageInput,
    *,
    model_key: str,
    pose_image: ImageInput | None,
    idempotency_key: str | None,
    fields: SubmitFields,
) -> Call:
    """The submit's multipart form. The files are read once, here: a retry sends the same
    bytes. The Idempotency-Key is the caller's, else a new one, so that a retry of a submit
    whose answer was lost returns the job it made instead of charging for a second one."""
    unknown = set(fields) - SUBMIT_FIELDS
    if unknown:
        raise TypeError(f"submit() got unexpected field(s): {', '.join(sorted(unknown))}")
    data = {"model_key": model_key}
    for name, value in fields.items():
        if value is not None:
            data[name] = _form_value(value)
    files = {"image": _upload(image, "image")}
    if pose_image is not None:
        files["pose_image"] = _upload(pose_image, "pose_image")
    key = idempotency_key or str(uuid.uuid4())
    return Call("POST", "/v1/generations", data=data, files=files, headers={"Idempotency-Key": key})


def submit_fields(**fields: Unpack[SubmitFields]) -> SubmitFields:
    return fields


def list_call(*, status: str | None, limit: int | None, cursor: str | None) -> Call:
    params: dict[str, str | int] = {}
    for name, value in (("status", status), ("limit", limit), ("cursor", cursor)):
        if value is not None:
            params[name] = value
    return Call("GET", "/v1/generations", params=params)


def events_headers(last_event_id: str | None) -> dict[str, str]:
    return {"Last-Event-ID": last_event_id} if last_event_id else {}


def checked(response: httpx.Response) -> httpx.Response:
    """The response, or its ApiError (the body must have been read)."""
    if response.is_success:
        return response
    raise ApiError.from_response(response)


def event_from(sse: ServerSentEvent) -> Event | None:
    """The job event an SSE message carries; None for one without data."""
    if not sse.data:
        return None
    job: Job = json.loads(sse.data)
    return Event(event=sse.event or "message", id=sse.id or None, job=job)


def output_suffix(job: Job, index: int) -> str:
    """The file suffix of a job's output: from its content type where the API gives one."""
    for output in job["outputs"]:
        if output["index"] == index:
            content_type = output.get("content_type", "image/png")
            return mimetypes.guess_extension(content_type) or ".png"
    return ".png"


class Updates:
    """`on_update` of `wait`, called once per new state of the job (a poll that finds the
    job as it was, or an event that repeats it, is not told again)."""

    def __init__(self, on_update: Callable[[Job], Any] | None) -> None:
        self.on_update = on_update
        self.last: Job | None = None

    def __call__(self, job: Job) -> None:
        if job != self.last and self.on_update is not None:
            self.on_update(job)
        self.last = job


def _form_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _upload(image: ImageInput, name: str) -> tuple[str, bytes, str]:
    if isinstance(image, bytes | bytearray | memoryview):
        data, filename = bytes(image), name
    elif isinstance(image, str | os.PathLike):
        path = Path(image)
        data, filename = path.read_bytes(), path.name
    else:
        data = image.read()
        filename = Path(str(getattr(image, "name", "") or name)).name
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    return filename, data, content_type


# -- retries ----------------------------------------------------------------------------------


def retryable(exc: BaseException) -> bool:
    """A refusal that carried nothing out, or a connection that was never made."""
    if isinstance(exc, ApiError):
        return exc.status in RETRIED_STATUSES
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


class wait_retry_after(wait_base):
    """The Retry-After the API sent, else `fallback`'s backoff."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            return exc.retry_after
        return float(self.fallback(retry_state))


class stop_retry_after_beyond(stop_base):
    """Give up at once when the API asks for a longer wait than the caller allows: the error
    goes back with its `retry_after`, for the caller to decide."""

    def __init__(self, max_wait: float) -> None:
        self.max_wait = max_wait

    def __call__(self, retry_state: RetryCallState) -> bool:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        return (
            isinstance(exc, ApiError)
            and exc.retry_after is not None
            and exc.retry_after > self.max_wait
        )


def retry_policy(*, max_retries: int, max_wait: float) -> dict[str, Any]:
    """Keyword arguments for tenacity's `Retrying` / `AsyncRetrying`."""
    return {
        "retry": retry_if_exception(retryable),
        "stop": stop_after_attempt(max_retries + 1) | stop_retry_after_beyond(max_wait),
        "wait": wait_retry_after(wait_exponential_jitter(initial=0.5, max=max_wait)),
        "reraise": True,
    }


class Resume:
    """Where an event stream is: the last event's id (sent back as Last-Event-ID), the delay
    the server asked for between reconnections (`retry:`), and the attempt that last brought
    an event, so that only reconnections that brought nothing count against the limit."""

    def __init__(
        self,
        last_event_id: str | None,
        *,
        max_retries: int,
        max_wait: float,
        deadline: float | None = None,
    ) -> None:
        self.last_event_id = last_event_id
        self.deadline = deadline
        self.server_delay: float | None = None
        self.progress_attempt = 0
        self.max_retries = max_retries
        self.max_wait = max_wait

    def headers(self) -> dict[str, str]:
        return events_headers(self.last_event_id)

    def take(self, sse: ServerSentEvent, attempt: int) -> Event | None:
        if sse.retry is not None:
            self.server_delay = sse.retry / 1000
        event = event_from(sse)
        if event is not None:
            self.last_event_id = event.id or self.last_event_id
            self.progress_attempt = attempt
        return event

    def fruitless(self, retry_state: RetryCallState) -> int:
        return retry_state.attempt_number - self.progress_attempt

    def read_timeout(self, longest: float) -> float:
        """How long a read may wait: `longest`, or less to wake up at the deadline."""
        if self.deadline is None:
            return longest
        return max(0.01, min(longest, self.deadline - time.monotonic()))

    def stop(self, retry_state: RetryCallState) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return True
        return self.fruitless(retry_state) > self.max_retries or stop_retry_after_beyond(
            self.max_wait
        )(retry_state)

    def wait(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            return exc.retry_after
        fruitless = self.fruitless(retry_state)
        if fruitless == 0:  # the stream broke after it brought events: resume at once
            return self.server_delay or 0.0
        # Counted from the last event, not from the first connection: a stream that ran for
        # an hour through a few reconnections starts its backoff afresh.
        backoff = min(self.max_wait, 0.5 * 2.0 ** (fruitless - 1))
        return max(self.server_delay or 0.0, backoff)

    def policy(self) -> dict[str, Any]:
        return {
            "retry": retry_if_exception(_resumable),
            "stop": self.stop,
            "wait": self.wait,
            "reraise": True,
        }


class StreamEnded(Exception):
    """The server closed the stream before a terminal event."""


def _resumable(exc: BaseException) -> bool:
    return retryable(exc) or isinstance(exc, StreamEnded | httpx.TransportError)
