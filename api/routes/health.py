"""/health (liveness), /ready (dependencies), /metrics (Prometheus)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.schemas import Readiness

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    # On the event loop, not the thread pool: a liveness probe must not queue behind a burst
    # of submits for a thread (a probe that times out under load gets a healthy pod killed).
    return {"status": "ok"}


def _timed(check: Any) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        check()
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", with its reason
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300], "ms": _ms(started)}
    return {"ok": True, "ms": _ms(started)}


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A dependency is down."}},
)
def ready(request: Request) -> JSONResponse:
    state = request.app.state

    def database() -> None:
        with state.db_engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def broker() -> None:
        with state.dispatcher.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    checks = {
        "database": _timed(database),
        "broker": _timed(broker),
        "storage": _timed(state.storage.check),
    }
    ok = all(c["ok"] for c in checks.values())
    # Informational, never a reason to be unready: per model, the jobs queued and the
    # workers serving it (a model nobody serves keeps its jobs waiting).
    models: dict[str, Any] | None = None
    if checks["database"]["ok"]:
        try:
            models = state.fleet.models()
        except Exception:  # noqa: BLE001 - the detail is best effort; the checks above decide
            models = None
    return JSONResponse(
        {"status": "ready" if ok else "unavailable", "checks": checks, "models": models},
        status_code=200 if ok else 503,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text format.",
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
        }
    },
)
def metrics(request: Request) -> Response:
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
