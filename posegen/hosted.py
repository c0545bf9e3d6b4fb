"""Hosted providers: a model run by an inference API instead of our GPUs.

The Hugging Face Inference API protocol: `POST {POSEGEN_HF_API_URL}/models/{remote_model}`
with `Authorization: Bearer {POSEGEN_HF_API_TOKEN}` and a JSON body `{"inputs": {"prompt",
"negative_prompt", "image" (base64 of the control image), "num_inference_steps",
"guidance_scale", "controlnet_conditioning_scale"}}`; the answer is the image's bytes, 503
with `{"estimated_time": s}` while the model loads, `{"error": ...}` otherwise.

Waiting is honest and bounded: a loading model is asked again after its estimate, a 429 after
its `Retry-After`, never past the job's stop time (its time limit or deadline); any other
answer is a `provider_error` carrying the provider's message. The token is a secret: it goes in
the request's header and nowhere else (no log line, error or job shows it).

Only httpx and tenacity here: the remote worker that calls this imports no torch.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from pydantic import SecretStr
from tenacity import RetryCallState, Retrying, retry_if_exception_type

from posegen.errors import JobError

log = logging.getLogger(__name__)

PROVIDER_LOADING = "provider_loading"
# How long a request may take to connect, and what a 429 without Retry-After waits.
CONNECT_SECONDS = 10.0
DEFAULT_BACKOFF = 5.0
# A provider's message is cut to this many characters in a job's error.
MESSAGE_CHARS = 500


@dataclass(frozen=True)
class HostedRequest:
    remote_model: str
    prompt: str
    negative_prompt: str
    control_png: bytes
    num_inference_steps: int
    guidance_scale: float
    controlnet_conditioning_scale: float

    def body(self) -> dict[str, object]:
        return {
            "inputs": {
                "prompt": self.prompt,
                "negative_prompt": self.negative_prompt,
                "image": base64.b64encode(self.control_png).decode("ascii"),
                "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale,
                "controlnet_conditioning_scale": self.controlnet_conditioning_scale,
            }
        }


class Busy(Exception):
    """The provider asked us to come back: its model loads (503 with an estimate) or it
    limits our rate (429). `seconds`: when to ask again."""

    def __init__(self, seconds: float, *, loading: bool) -> None:
        super().__init__(f"come back in {seconds:.1f} s")
        self.seconds, self.loading = seconds, loading


class Stopped(Exception):
    """The job was canceled, or its stop time came, while it waited on the provider."""


class OutOfTime(Stopped):
    """The provider would answer after the job's stop time: its answer did not come in time,
    or it asked us to come back later than that."""


def provider_error(message: str) -> JobError:
    return JobError("provider_error", message)


class HuggingFace:
    """One provider account: a base URL, a token, and an httpx client shared by every job of
    the process (its connection pool)."""

    name = "huggingface"

    def __init__(
        self,
        *,
        base_url: str,
        token: SecretStr | None,
        client: httpx.Client,
        connect_seconds: float = CONNECT_SECONDS,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._client = client
        self._connect_seconds = connect_seconds

    def generate(
        self,
        request: HostedRequest,
        *,
        stop_at: float,
        on_busy: Callable[[Busy], None],
        should_stop: Callable[[], bool],
        on_retry: Callable[[Busy], None] | None = None,
    ) -> bytes:
        """The image's bytes. Asks again while the provider is busy (`on_busy` told when the
        wait starts, `on_retry` when it ends, before the request is sent again), until
        `stop_at` (time.time()); raises Stopped when `should_stop` says so, when an answer or
        the next try would come after `stop_at`; JobError `provider_error` for any other
        answer than an image."""
        waited: list[Busy] = []  # the wait being slept, until the next try starts

        def stop(state: RetryCallState) -> bool:
            return should_stop() or time.time() + (state.upcoming_sleep or 0) >= stop_at

        def before_sleep(state: RetryCallState) -> None:
            busy = state.outcome.exception() if state.outcome else None
            if isinstance(busy, Busy):
                waited[:] = [busy]
                on_busy(busy)

        def before(state: RetryCallState) -> None:
            if waited and on_retry is not None:
                on_retry(waited.pop())

        def gave_up(state: RetryCallState) -> bytes:
            if should_stop():
                raise Stopped("canceled while the provider was busy")
            busy = state.outcome.exception() if state.outcome else None
            later = (
                f" (it asked to come back in {busy.seconds:.0f} s)"
                if isinstance(busy, Busy)
                else ""
            )
            raise OutOfTime(f"The provider could not be done in time{later}.")

        retrying = Retrying(
            retry=retry_if_exception_type(Busy),
            wait=_busy_seconds,
            stop=stop,
            sleep=lambda seconds: _sleep(seconds, should_stop),
            before_sleep=before_sleep,
            before=before,
            retry_error_callback=gave_up,
        )
        data: bytes = retrying(self._once, request, stop_at=stop_at)
        return data

    def _once(self, request: HostedRequest, *, stop_at: float) -> bytes:
        left = stop_at - time.time()
        if left <= 0:
            raise OutOfTime("The job's time ran out before the provider was asked.")
        headers = {"Accept": "image/png"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        url = f"{self.base_url}/models/{request.remote_model}"
        try:
            response = self._client.post(
                url,
                json=request.body(),
                headers=headers,
                # A little past the stop time, so that the job is out of time when it fires.
                timeout=httpx.Timeout(left + 0.05, connect=min(self._connect_seconds, left + 0.05)),
            )
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            if time.time() >= stop_at:  # the wait for a connection was cut by the stop time
                raise OutOfTime("The provider did not answer within the job's time.") from exc
            raise _unreachable(exc) from exc  # no connection in CONNECT_SECONDS: not our time
        except httpx.TimeoutException as exc:  # its stop time came first
            raise OutOfTime("The provider did not answer within the job's time.") from exc
        except httpx.TransportError as exc:  # after the transport's own retries
            raise _unreachable(exc) from exc
        return self._answer(response)

    def _answer(self, response: httpx.Response) -> bytes:
        status = response.status_code
        if status == 200 and response.headers.get("content-type", "").startswith("image/"):
            return response.content
        body = _json(response)
        estimate = body.get("estimated_time")
        if status == 503 and isinstance(estimate, int | float):
            raise Busy(max(float(estimate), 0.5), loading=True)
        if status == 429:
            raise Busy(_retry_after(response), loading=False)
        said = body.get("error") if body else response.text
        message = f"The provider answered {status}: {self._scrub(str(said or 'no image'))}"
        raise provider_error(message[:MESSAGE_CHARS])

    def _scrub(self, text: str) -> str:
        """A provider that echoes the token back (in an error about it) gets it blanked."""
        token = self._token.get_secret_value() if self._token is not None else ""
        return text.replace(token, "[token]") if token else text


def _unreachable(exc: httpx.TransportError) -> JobError:
    return provider_error(f"The provider could not be reached: {type(exc).__name__}.")


def _busy_seconds(state: RetryCallState) -> float:
    busy = state.outcome.exception() if state.outcome else None
    return busy.seconds if isinstance(busy, Busy) else DEFAULT_BACKOFF


def _sleep(seconds: float, should_stop: Callable[[], bool]) -> None:
    """Sleep in short slices, so a cancel is seen within half a second."""
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        if should_stop():
            raise Stopped("canceled while waiting on the provider")
        time.sleep(min(0.5, left))


def _retry_after(response: httpx.Response) -> float:
    """Retry-After in seconds, or as an HTTP date; DEFAULT_BACKOFF when absent or unreadable."""
    value = response.headers.get("retry-after", "").strip()
    try:
        return max(float(value), 0.5)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return DEFAULT_BACKOFF
    return max((when - dt.datetime.now(dt.UTC)).total_seconds(), 0.5)


def _json(response: httpx.Response) -> dict[str, object]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def make_client(*, concurrency: int) -> httpx.Client:
    """The process's client: a connection pool as large as the jobs in flight, and a
    transport that retries a failed connect (not a request the provider may have run)."""
    return httpx.Client(
        transport=httpx.HTTPTransport(
            retries=2,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        ),
    )
