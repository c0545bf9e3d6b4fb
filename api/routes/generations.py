"""/v1/generations: submit, list, cancel, delete, fetch outputs (the poll: `api/poll.py`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse

from api.deps import (
    CurrentUser,
    DispatcherDep,
    FleetDep,
    KeyFirstRoute,
    ReadSessionDep,
    SessionDep,
    SettingsDep,
    StorageDep,
)
from api.openapi import JOB_LINKS, documented
from api.schemas import Job, JobPage
from posegen import jobs, retention, webhooks
from posegen.errors import NotFound, PayloadTooLarge
from posegen.params import GenerationParams
from posegen.settings import Settings
from posegen.storage import Storage
from posegen.storage.keys import pose_key, preview_key

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/generations", tags=["generations"], route_class=KeyFirstRoute)
WEBHOOK_EVENTS = "Comma list of started, progress, completed (every terminal event)."
DEADLINE_FIELD = Form(
    ge=1,
    le=jobs.MAX_DEADLINE_SECONDS,
    description="Not completed this many seconds after submit: failed with "
    "`deadline_exceeded`, refunded (not run if it has not started).",
)
STATUSES = "queued|processing|completed|failed|canceled"
NO_NUL = "^[^\\x00]*$"  # the database stores no NUL character
# At most one pose (an empty field is a field left out).
ONE_POSE = {
    "not": {
        "required": ["pose_template_id", "pose_image"],
        "properties": {"pose_template_id": {"minLength": 1}, "pose_image": {"minLength": 1}},
    },
    # Webhook events chosen need a URL to go to.
    "if": {"required": ["webhook_events"], "properties": {"webhook_events": {"minLength": 1}}},
    "then": {"required": ["webhook_url"], "properties": {"webhook_url": {"minLength": 1}}},
}
# `webhook_events` as posegen.webhooks.parse_choices takes it: a comma list of the choices,
# spaces and empty items allowed.
EVENT_CHOICE = f"({'|'.join(webhooks.CHOICES)})?"
WEBHOOK_EVENTS_PATTERN = rf"^\s*{EVENT_CHOICE}\s*(,\s*{EVENT_CHOICE}\s*)*$"
# The schema states the pattern; the check is parse_choices', whose message names the unknown
# event.
WEBHOOK_EVENTS_FIELD = Form(
    max_length=64, json_schema_extra={"pattern": WEBHOOK_EVENTS_PATTERN}, description=WEBHOOK_EVENTS
)
SUBMITTED: dict[int | str, dict[str, Any]] = {
    202: {
        "description": "The job, queued.",
        "headers": {"Location": {"description": "The job's URL.", "schema": {"type": "string"}}},
        "links": JOB_LINKS,
    },
    200: {
        "model": Job,
        "description": "The job an earlier submit with this Idempotency-Key made (no charge).",
        "links": JOB_LINKS,
    },
}


def _read(upload: UploadFile | None, settings: Settings, field: str) -> bytes | None:
    # The form is parsed before the route runs; the upload is a spooled file by now.
    if upload is None:
        return None
    data = upload.file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"The {field} is larger than {settings.max_upload_bytes} bytes.")
    return data


# Routes return JSONResponse themselves: the dicts come from the domain in the contract's shape
# already, and FastAPI's validation of them against the response model would be paid on
# every poll. The response models still document the shapes in the OpenAPI schema.
#
# Routes doing database work are plain `def`s (run on the thread pool): an `async def` one
# calling a sync driver would stall the event loop for every other request. The poll
# (`api/poll.py`) is the exception: it awaits an async driver, and what it runs on the loop is
# short.


@router.post(
    "",
    status_code=202,
    response_model=Job,
    responses={**SUBMITTED, **documented(402, 403, 409, 413, 415, 422, 429)},
    openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": ONE_POSE}}}},
)
def submit_generation(
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    dispatcher: DispatcherDep,
    fleet: FleetDep,
    image: Annotated[UploadFile, File(description="The subject photo (PNG, JPEG or WebP).")],
    model_key: Annotated[str, Form(min_length=1, max_length=100, pattern=NO_NUL)],
    params: Annotated[GenerationParams, Form()],
    prompt: Annotated[str | None, Form(max_length=1000, pattern=NO_NUL)] = None,
    negative_prompt: Annotated[str | None, Form(max_length=1000, pattern=NO_NUL)] = None,
    pose_template_id: Annotated[str | None, Form(max_length=100, pattern=NO_NUL)] = None,
    pose_image: Annotated[
        UploadFile | None, File(description="A photo whose pose to take instead.")
    ] = None,
    webhook_url: Annotated[str | None, Form(max_length=2048, pattern=NO_NUL)] = None,
    webhook_events: Annotated[str | None, WEBHOOK_EVENTS_FIELD] = None,
    deadline_seconds: Annotated[int | None, DEADLINE_FIELD] = None,
    idempotency_key: Annotated[
        str | None, Header(min_length=1, max_length=255, pattern=r"\S")
    ] = None,
) -> JSONResponse:
    request = jobs.GenerationRequest(
        model_key=model_key,
        image=_read(image, settings, "image") or b"",
        prompt=prompt,
        negative_prompt=negative_prompt,
        pose_template_id=pose_template_id or None,
        pose_image=_read(pose_image, settings, "pose_image"),
        params=params,
        webhook_url=webhook_url or None,
        webhook_events=webhook_events or None,
        deadline_seconds=deadline_seconds,
    )
    submitted = jobs.submit(
        session,
        user=user,
        request=request,
        storage=storage,
        settings=settings,
        idempotency_key=idempotency_key,
        unserved=fleet.unserved,
    )
    # The answer (queue position included) is read inside the job's transaction: after the
    # commit it would take a transaction of its own, two more round trips (BEGIN, ROLLBACK).
    answer = submitted.answer or jobs.job_json(session, submitted.job)
    dispatcher.commit(session)
    what = "job submitted" if submitted.created else "job replayed (idempotency key)"
    job = submitted.job
    log.info(what, extra={"job_id": job.id, "model_key": job.model_key, "user_id": user.id})
    return JSONResponse(
        answer,
        status_code=202 if submitted.created else 200,
        headers={"Location": f"/v1/generations/{submitted.job.id}"},
    )


NEXT_PAGE = {
    "NextPage": {
        "operationId": "list_generations",
        "parameters": {"cursor": "$response.body#/next_cursor"},
    }
}


@router.get("", response_model=JobPage, responses={200: {"links": NEXT_PAGE}, **documented(422)})
def list_generations(
    user: CurrentUser,
    session: ReadSessionDep,
    status: Annotated[
        str | None,
        Query(
            max_length=100,
            pattern=f"^({STATUSES})(,({STATUSES}))*$",
            description="Only jobs in this status, or in these (a comma list).",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> JSONResponse:
    page = jobs.list_for_user(session, user=user, status=status, limit=limit, cursor=cursor)
    items = [jobs.job_json(session, j) for j in page.items]
    return JSONResponse({"items": items, "next_cursor": page.next_cursor})


@router.post("/{job_id}/cancel", response_model=Job, responses=documented(404, 409))
def cancel_generation(
    job_id: str,
    user: CurrentUser,
    session: SessionDep,
    dispatcher: DispatcherDep,
    request: Request,
) -> JSONResponse:
    job = jobs.cancel(session, job_id=job_id, user=user)
    answer = jobs.job_json(session, job)  # in the transaction, as for a submit
    dispatcher.commit(session)
    request.app.state.metrics.jobs.finished.labels("canceled", job.model_key).inc()
    log.info("job canceled", extra={"job_id": job.id, "user_id": user.id})
    return JSONResponse(answer)


@router.delete("/{job_id}", status_code=204, response_class=Response, responses=documented(404))
def delete_generation(
    job_id: str,
    user: CurrentUser,
    session: SessionDep,
    storage: StorageDep,
    dispatcher: DispatcherDep,
    request: Request,
) -> Response:
    """Remove the job's photos and outputs from storage, canceling it first if it still runs
    (refunded as any cancel). The job stays listed, with `deleted_at` and no outputs."""
    deleted = retention.delete(session, job_id=job_id, user=user)
    model_key = deleted.job.model_key
    dispatcher.commit(session)  # the intent first: the storage sweep finishes what this cannot
    if deleted.canceled:
        request.app.state.metrics.jobs.finished.labels("canceled", model_key).inc()
    retention.purge_now(request.app.state.sessions, storage=storage, job_id=deleted.job.id)
    log.info("job deleted", extra={"job_id": job_id, "user_id": user.id})
    return Response(status_code=204)


@router.get(
    "/{job_id}/outputs/{index}",
    responses={
        200: {
            "content": {
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in ("image/png", "image/webp", "image/jpeg")
            },
            "description": "The image, in the job's output_format (local storage).",
        },
        307: {"description": "Redirect to a presigned URL (S3 storage)."},
        **documented(404, 422),
    },
    response_class=Response,
)
def get_output(
    job_id: str, index: int, user: CurrentUser, session: ReadSessionDep, storage: StorageDep
) -> Response:
    key, content_type = jobs.output_key(session, job_id=job_id, index=index, user=user)
    return stored_file(
        storage, key, content_type=content_type, filename=f"{job_id}-{index}{Path(key).suffix}"
    )


@router.get(
    "/{job_id}/pose",
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The skeleton (local storage).",
        },
        307: {"description": "Redirect to a presigned URL (S3 storage)."},
        **documented(401, 404, 422),
    },
    response_class=Response,
)
def get_pose(
    job_id: str, user: CurrentUser, session: ReadSessionDep, storage: StorageDep
) -> Response:
    """The OpenPose skeleton the job was conditioned on (PNG), once its worker drew it."""
    job = jobs.get_for_user(session, job_id=job_id, user=user)
    if job.started_at is None or job.deleted_at is not None:
        state = "deleted" if job.deleted_at else "not started yet"
        raise NotFound(f"Generation {job_id} has no pose image: it is {state}.")
    return stored_file(
        storage, pose_key(job.id), content_type="image/png", filename=f"{job.id}-pose.png"
    )


@router.get(
    "/{job_id}/preview",
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The preview (local storage).",
        },
        307: {"description": "Redirect to a presigned URL (S3 storage)."},
        **documented(401, 404, 422),
    },
    response_class=Response,
)
def get_preview(
    job_id: str, user: CurrentUser, session: ReadSessionDep, storage: StorageDep
) -> Response:
    """The latest step preview of a job submitted with `preview=true`, while it runs."""
    job = jobs.get_for_user(session, job_id=job_id, user=user)
    if not job.params.get("preview"):
        raise NotFound(f"Generation {job_id} was not submitted with preview=true.")
    if job.status != "processing":
        raise NotFound(f"Generation {job_id} is {job.status}: previews exist while it runs.")
    response = stored_file(
        storage, preview_key(job.id), content_type="image/png", filename=f"{job.id}-preview.png"
    )
    response.headers["Cache-Control"] = "no-store"  # overwritten at each preview
    return response


def stored_file(storage: Storage, key: str, *, content_type: str, filename: str) -> Response:
    """A stored image: its bytes from local storage, or a redirect to a presigned URL."""
    url = storage.presigned_url(key)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    path = storage.local_path(key)
    if path is None or not path.is_file():
        raise NotFound(f"{filename} is missing from storage.")
    return FileResponse(path, media_type=content_type, filename=filename)
