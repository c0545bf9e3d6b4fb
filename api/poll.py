"""GET /v1/generations/{id}, the status poll: the hottest route, in one home.

The key and the caller's job are one statement (a queued job's position a second), awaited
on the event loop (`db.fast.AsyncReads`): no hop to a worker thread and back, which cost
more than the query.
The route is matched before FastAPI's router and answered without FastAPI's request handling
(no dependency solving, no validation of the answer): a quarter of a poll's CPU
(`python -m bench.floor`; `bench.api` under load). It is still a FastAPI route, so the OpenAPI
schema documents it as any other, and it passes through the same middleware and exception
handlers (metrics, error bodies, 503 for a lost database)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy import and_, bindparam, select

from api.openapi import documented
from api.schemas import Job
from db.fast import AsyncReads, DriverQuery
from db.models import ApiKey, Generation
from posegen import catalog
from posegen.accounts import bearer_key_hash, live_key
from posegen.errors import NotFound
from posegen.jobs import queries
from posegen.render import RENDERED_COLUMNS, render_job


def _statement() -> Any:
    """Key and job in one statement, built once (building an expression this size costs more
    than running it). The job's columns are read as a plain row, not an ORM object: loading
    an entity costs more than the query on this hot path, and only the columns the job JSON
    shows, with what its queue position is computed from. `job` aliases the jobs table."""
    job = Generation.__table__.alias("job")
    return (
        select(
            ApiKey.revoked_at,
            job.c.user_id.label("job_user_id"),
            job.c.model_id.label("job_model_id"),
            *(job.c[name] for name in RENDERED_COLUMNS),
        )
        .select_from(ApiKey.__table__)
        .outerjoin(job, and_(job.c.id == bindparam("job_id"), job.c.user_id == ApiKey.user_id))
        .where(ApiKey.key_hash == bindparam("key_hash"))
    )


POLL = DriverQuery(_statement())


async def poll(reads: AsyncReads, *, authorization: str | None, job_id: str) -> dict[str, Any]:
    """A status poll in one round trip (auth and fetch as separate queries cost two), and a
    second for a queued job's position (`posegen.scheduler`). The model's run time, for the
    ETA, comes from this process's cache (`posegen.jobs.queries`), read here only when stale."""
    key_hash = bearer_key_hash(authorization)
    # An id that is not a UUID matches no job; the key is still checked (401 before 404).
    params = {"job_id": job_id if catalog.is_uuid(job_id) else None, "key_hash": key_hash}
    row = live_key(await reads.first(POLL, params))
    if row.id is None:  # another user's job is indistinguishable from a missing one
        raise NotFound(f"No generation {job_id!r}.")
    position = per_job = None
    if row.status == "queued":
        place = {
            "user_id": row.job_user_id,
            "model_id": row.job_model_id,
            "created_at": row.created_at,
        }
        position = queries.capped((await reads.first(queries.POSITION, place))[0])
        per_job = await _run_seconds(reads, row.model_key)
    return render_job(row, queue_position=position, eta_seconds=queries.eta(per_job, position))


async def _run_seconds(reads: AsyncReads, model_key: str) -> float | None:
    """`queries.recent_run_seconds`, awaited."""
    cached = queries.cached_run_seconds(model_key)
    if cached is not None:
        return cached[1]
    rows = await reads.all(queries.RECENT_RUNS, {"model_key": model_key})
    return queries.remember_run_seconds(model_key, rows)


async def get_generation(request: Request, job_id: str) -> JSONResponse:
    authorization = request.headers.get("authorization")
    reads: AsyncReads = request.app.state.async_reads
    return JSONResponse(await poll(reads, authorization=authorization, job_id=job_id))


class _PlainRoute(APIRoute):
    """A FastAPI route answered by its endpoint alone: the path parameters are passed as they
    were matched, no dependency is solved, and the endpoint's answer goes out as it is."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handle(request: Request) -> Response:
            response: Response = await endpoint(request, **request.path_params)
            return response

        return handle


# The app puts it first among its routes (`api.app`), before the routers it includes.
ROUTE = _PlainRoute(
    "/v1/generations/{job_id}",
    get_generation,
    methods=["GET"],
    response_model=Job,
    responses=documented(404),
    tags=["generations"],
    summary="Get Generation",
    operation_id="get_generation",
    description="A job's status, progress, queue position and outputs.",
)
