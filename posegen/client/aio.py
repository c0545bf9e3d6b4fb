"""`AsyncClient`: the API from Python, on asyncio (httpx). The same calls as `Client`."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Unpack

import anyio
import httpx
from httpx_sse import aconnect_sse
from tenacity import AsyncRetrying

from posegen.client import protocol
from posegen.client.errors import ApiError, StreamLost, WaitTimeout
from posegen.client.protocol import Call, ImageInput, Resume, StreamEnded, SubmitFields
from posegen.client.types import TERMINAL, Event, Job, JobPage, Me, Model, PoseTemplate


class AsyncClient:
    """`async with AsyncClient(url, key) as client: job = await client.submit(...)`; retries
    and errors as `Client`'s."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        max_retry_wait: float = 60.0,
        stream_read_timeout: float = 45.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._http.base_url = httpx.URL(base_url)
        self._http.headers["Authorization"] = f"Bearer {api_key}"
        self._retry = protocol.retry_policy(max_retries=max_retries, max_wait=max_retry_wait)
        self._max_retries = max_retries
        self._max_retry_wait = max_retry_wait
        self._stream_read_timeout = stream_read_timeout
        self._events_route: bool | None = None

    # -- the routes -------------------------------------------------------------------------

    async def submit(
        self,
        image: ImageInput,
        *,
        model_key: str,
        pose_image: ImageInput | None = None,
        idempotency_key: str | None = None,
        **fields: Unpack[SubmitFields],
    ) -> Job:
        # A path is read on a worker thread: a large photo would hold up the event loop.
        call = await anyio.to_thread.run_sync(
            lambda: protocol.submit_call(
                image,
                model_key=model_key,
                pose_image=pose_image,
                idempotency_key=idempotency_key,
                fields=fields,
            )
        )
        job: Job = (await self._send(call)).json()
        return job

    async def get(self, job_id: str) -> Job:
        job: Job = (await self._send(Call("GET", protocol.job_path(job_id)))).json()
        return job

    async def list(
        self, *, status: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> AsyncIterator[JobPage]:
        while True:
            call = protocol.list_call(status=status, limit=limit, cursor=cursor)
            page: JobPage = (await self._send(call)).json()
            yield page
            cursor = page["next_cursor"]
            if not cursor:
                return

    async def cancel(self, job_id: str) -> Job:
        job: Job = (await self._send(Call("POST", protocol.job_path(job_id, "cancel")))).json()
        return job

    async def delete(self, job_id: str) -> None:
        await self._send(Call("DELETE", protocol.job_path(job_id)))

    async def models(self) -> builtins.list[Model]:
        items: builtins.list[Model] = (await self._send(Call("GET", "/v1/models"))).json()["items"]
        return items

    async def pose_templates(self) -> builtins.list[PoseTemplate]:
        response = await self._send(Call("GET", "/v1/pose-templates"))
        items: builtins.list[PoseTemplate] = response.json()["items"]
        return items

    async def me(self) -> Me:
        me: Me = (await self._send(Call("GET", "/v1/me"))).json()
        return me

    async def download(self, job_id: str, index: int = 0, path: str | Path | None = None) -> bytes:
        call = Call("GET", protocol.job_path(job_id, "outputs", str(index)))
        content = (await self._send(call, follow_redirects=True)).content
        if path is not None:
            await anyio.Path(path).write_bytes(content)
        return content

    # -- following a job -----------------------------------------------------------------------

    async def events(
        self, job_id: str, *, last_event_id: str | None = None
    ) -> AsyncIterator[Event]:
        async for event in self._events(job_id, last_event_id=last_event_id, deadline=None):
            yield event

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_update: Callable[[Job], Any] | None = None,
        poll_interval: float = 0.5,
    ) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        job = await self.get(job_id)
        notify = protocol.Updates(on_update)
        notify(job)
        if job["status"] in TERMINAL:
            return job
        if self._events_route is not False:
            try:
                async for event in self._events(job_id, last_event_id=None, deadline=deadline):
                    self._events_route = True
                    job = event.job
                    notify(job)
                    if event.terminal:
                        return job
            except ApiError as exc:
                if exc.status != 404 or self._events_route:
                    raise
                self._events_route = False
            except StreamLost as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(job, timeout or 0) from exc
                raise
        while job["status"] not in TERMINAL:
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(job, timeout or 0)
            await asyncio.sleep(poll_interval)
            job = await self.get(job_id)
            notify(job)
        return job

    async def _events(
        self, job_id: str, *, last_event_id: str | None, deadline: float | None
    ) -> AsyncIterator[Event]:
        resume = Resume(
            last_event_id,
            max_retries=self._max_retries,
            max_wait=self._max_retry_wait,
            deadline=deadline,
        )
        path = protocol.job_path(job_id, "events")
        try:
            async for attempt in AsyncRetrying(**resume.policy()):
                with attempt:
                    read = resume.read_timeout(self._stream_read_timeout)
                    async with aconnect_sse(
                        self._http,
                        "GET",
                        path,
                        headers=resume.headers(),
                        timeout=httpx.Timeout(self._http.timeout.connect, read=read),
                    ) as source:
                        if not source.response.is_success:
                            await source.response.aread()
                            protocol.checked(source.response)
                        async for sse in source.aiter_sse():
                            event = resume.take(sse, attempt.retry_state.attempt_number)
                            if event is not None:
                                yield event
                                if event.terminal:
                                    return
                    raise StreamEnded
        except (httpx.TransportError, StreamEnded) as exc:
            raise StreamLost(f"the event stream of job {job_id} broke: {exc!r}") from exc

    # -- plumbing ------------------------------------------------------------------------------

    async def _send(self, call: Call, **extra: Any) -> httpx.Response:
        response: httpx.Response = await AsyncRetrying(**self._retry)(
            self._send_once, call, **extra
        )
        return response

    async def _send_once(self, call: Call, **extra: Any) -> httpx.Response:
        response = await self._http.request(call.method, call.path, **call.kwargs(), **extra)
        return protocol.checked(response)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
