"""`Client`: the API from Python, blocking (httpx)."""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Unpack

import httpx
from httpx_sse import connect_sse
from tenacity import Retrying

from posegen.client import protocol
from posegen.client.errors import ApiError, StreamLost, WaitTimeout
from posegen.client.protocol import Call, ImageInput, Resume, StreamEnded, SubmitFields
from posegen.client.types import TERMINAL, Event, Job, JobPage, Me, Model, PoseTemplate


class Client:
    """`Client("http://127.0.0.1:8000", "pk_...")`. Refusals that carried nothing out (429,
    503) are sent again up to `max_retries` times, after the Retry-After the API asked for
    (given up at once when that is longer than `max_retry_wait` seconds), else with
    exponential backoff. Every error the API answers raises `ApiError`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        max_retry_wait: float = 60.0,
        stream_read_timeout: float = 45.0,
        http: httpx.Client | None = None,
    ) -> None:
        self._http = http or httpx.Client(timeout=timeout)
        self._http.base_url = httpx.URL(base_url)
        self._http.headers["Authorization"] = f"Bearer {api_key}"
        self._retry = protocol.retry_policy(max_retries=max_retries, max_wait=max_retry_wait)
        self._max_retries = max_retries
        self._max_retry_wait = max_retry_wait
        # The stream sends a keep-alive every 15 s: three missed ones mean a dead connection.
        self._stream_read_timeout = stream_read_timeout
        self._events_route: bool | None = None  # learnt on first use: older servers lack it

    # -- the routes -------------------------------------------------------------------------

    def submit(
        self,
        image: ImageInput,
        *,
        model_key: str,
        pose_image: ImageInput | None = None,
        idempotency_key: str | None = None,
        **fields: Unpack[SubmitFields],
    ) -> Job:
        """Submit a job: `image` (and `pose_image`) as a path, bytes or a binary file;
        `fields` as the contract names them (`prompt`, `pose_template_id`, `seed`, ...)."""
        call = protocol.submit_call(
            image,
            model_key=model_key,
            pose_image=pose_image,
            idempotency_key=idempotency_key,
            fields=fields,
        )
        job: Job = self._send(call).json()
        return job

    def get(self, job_id: str) -> Job:
        job: Job = self._send(Call("GET", protocol.job_path(job_id))).json()
        return job

    def list(
        self, *, status: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> Iterator[JobPage]:
        """The caller's jobs, newest first, a page at a time (each page fetched as the
        iteration reaches it)."""
        while True:
            page: JobPage = self._send(
                protocol.list_call(status=status, limit=limit, cursor=cursor)
            ).json()
            yield page
            cursor = page["next_cursor"]
            if not cursor:
                return

    def cancel(self, job_id: str) -> Job:
        job: Job = self._send(Call("POST", protocol.job_path(job_id, "cancel"))).json()
        return job

    def delete(self, job_id: str) -> None:
        self._send(Call("DELETE", protocol.job_path(job_id)))

    def models(self) -> builtins.list[Model]:
        items: builtins.list[Model] = self._send(Call("GET", "/v1/models")).json()["items"]
        return items

    def pose_templates(self) -> builtins.list[PoseTemplate]:
        call = Call("GET", "/v1/pose-templates")
        items: builtins.list[PoseTemplate] = self._send(call).json()["items"]
        return items

    def me(self) -> Me:
        me: Me = self._send(Call("GET", "/v1/me")).json()
        return me

    def download(self, job_id: str, index: int = 0, path: str | Path | None = None) -> bytes:
        """An output's bytes, written to `path` too when one is given. A redirect to object
        storage is followed (httpx drops the API key when the host changes)."""
        call = Call("GET", protocol.job_path(job_id, "outputs", str(index)))
        content = self._send(call, follow_redirects=True).content
        if path is not None:
            Path(path).write_bytes(content)
        return content

    # -- following a job -----------------------------------------------------------------------

    def events(self, job_id: str, *, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's events as they happen, until a terminal one. A broken stream is resumed
        with Last-Event-ID (no event lost or repeated); `StreamLost` when it cannot be."""
        yield from self._events(job_id, last_event_id=last_event_id, deadline=None)

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_update: Callable[[Job], Any] | None = None,
        poll_interval: float = 0.5,
    ) -> Job:
        """The job once it is completed, failed or canceled (a failure is not raised: see
        `job["error"]`). `on_update` sees each new state. Follows the event stream, or polls
        where the server has none. `WaitTimeout` after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get(job_id)
        notify = protocol.Updates(on_update)
        notify(job)
        if job["status"] in TERMINAL:
            return job
        if self._events_route is not False:
            try:
                for event in self._events(job_id, last_event_id=None, deadline=deadline):
                    self._events_route = True
                    job = event.job
                    notify(job)
                    if event.terminal:
                        return job
            except ApiError as exc:
                if exc.status != 404 or self._events_route:
                    raise
                self._events_route = False  # the job exists (above): the route does not
            except StreamLost as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(job, timeout or 0) from exc
                raise
        return self._poll(
            job, deadline=deadline, timeout=timeout, notify=notify, every=poll_interval
        )

    def _poll(
        self,
        job: Job,
        *,
        deadline: float | None,
        timeout: float | None,
        notify: protocol.Updates,
        every: float,
    ) -> Job:
        while job["status"] not in TERMINAL:
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(job, timeout or 0)
            time.sleep(every)
            job = self.get(job["id"])
            notify(job)
        return job

    def _events(
        self, job_id: str, *, last_event_id: str | None, deadline: float | None
    ) -> Iterator[Event]:
        resume = Resume(
            last_event_id,
            max_retries=self._max_retries,
            max_wait=self._max_retry_wait,
            deadline=deadline,
        )
        path = protocol.job_path(job_id, "events")
        try:
            for attempt in Retrying(**resume.policy()):
                with attempt:
                    read = resume.read_timeout(self._stream_read_timeout)
                    with connect_sse(
                        self._http,
                        "GET",
                        path,
                        headers=resume.headers(),
                        timeout=httpx.Timeout(self._http.timeout.connect, read=read),
                    ) as source:
                        if not source.response.is_success:
                            source.response.read()
                            protocol.checked(source.response)
                        for sse in source.iter_sse():
                            event = resume.take(sse, attempt.retry_state.attempt_number)
                            if event is not None:
                                yield event
                                if event.terminal:
                                    return
                    raise StreamEnded
        except (httpx.TransportError, StreamEnded) as exc:
            raise StreamLost(f"the event stream of job {job_id} broke: {exc!r}") from exc

    # -- plumbing ------------------------------------------------------------------------------

    def _send(self, call: Call, **extra: Any) -> httpx.Response:
        return Retrying(**self._retry)(self._send_once, call, **extra)

    def _send_once(self, call: Call, **extra: Any) -> httpx.Response:
        response = self._http.request(call.method, call.path, **call.kwargs(), **extra)
        return protocol.checked(response)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
