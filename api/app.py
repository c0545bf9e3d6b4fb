"""The FastAPI application factory (`uvicorn --factory api.app:create_app`)."""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from anyio import to_thread
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors, openapi, poll
from api.event_hub import EventHub
from api.fleet import Fleet
from api.routes import catalog, events, generations, health, playground
from db.fast import AsyncReads
from db.models import Generation, status_is
from db.session import make_engine, make_session_factory
from posegen.events import event_log
from posegen.logs import configure_logging
from posegen.metrics import Metrics
from posegen.queue import Dispatcher, make_producer
from posegen.settings import Settings, get_settings
from posegen.storage import storage_from_settings


class BodyLimit:
    """Refuse an oversized upload with 413 before reading all of it.

    The Content-Length is checked up front; a body without one (chunked) is counted as it
    streams in, and reading stops at the limit.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _send_413(scope, receive, send, self.max_bytes)
                return
        received = 0
        refused = False

        async def limited() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # Answer 413 now and tell the app the client went away, so it stops reading.
                refused = True
                await _send_413(scope, receive, send, self.max_bytes)
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:  # the 413 went out already: drop whatever the app answers
                await send(message)

        await self.app(scope, limited, guarded_send)


class Observe:
    """Request counts and latency by route (a plain ASGI middleware: Starlette's
    BaseHTTPMiddleware would add a task and two streams to every request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics: Metrics = scope["app"].state.metrics
            metrics.requests.labels(route, scope["method"], str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - started)
            if route == "/v1/generations" and scope["method"] == "POST":
                metrics.submits.labels(str(status)).inc()


async def _send_413(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    message = f"The request body is larger than {limit} bytes."
    response = errors.error_response(413, "payload_too_large", message, {"connection": "close"})
    await response(scope, receive, send)


async def _open_state(app: FastAPI, settings: Settings, db_engine: Any) -> None:
    """What the routes reach through `app.state`, made at start-up."""
    app.state.settings = settings
    app.state.db_engine = db_engine
    app.state.sessions = make_session_factory(db_engine)
    app.state.read_sessions = make_session_factory(
        db_engine.execution_options(isolation_level="AUTOCOMMIT")
    )
    # Status polls and key checks await the database on the event loop (`db/fast.py`).
    # Each holds its connection for one round trip and waits for one without holding a
    # thread, so a fixed number of connections serves them all.
    app.state.async_reads = AsyncReads(settings.database_url, pool_size=settings.api_threads)
    await app.state.async_reads.start()
    app.state.storage = storage_from_settings(settings)
    app.state.dispatcher = Dispatcher(make_producer(settings), events=event_log(settings))
    app.state.event_hub = EventHub.for_settings(settings)
    app.state.metrics = Metrics()
    app.state.fleet = Fleet(app.state.dispatcher, app.state.sessions)
    app.state.metrics.watch_queue(
        lambda: _active_counts(app), app.state.fleet.depths, app.state.fleet.workers_per_model
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings, process="api")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Sync routes run on anyio's thread pool: as many threads as connections kept open,
        # so no request waits for a connection and none is opened and closed per request.
        to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        db_engine = make_engine(
            settings.database_url,
            pool_size=settings.api_threads + 2,  # + /metrics and /ready
            max_overflow=settings.api_threads,
        )
        await _open_state(app, settings, db_engine)
        # What start-up made lives as long as the process: out of the collector's way, so a
        # full collection under load scans only what requests allocate (the status route's
        # p99: bench.api).
        gc.collect()
        gc.freeze()
        # And collect the young generation every 50,000 allocations instead of 700. With 700,
        # the objects of the requests in flight at each young collection were promoted to the
        # old generation, which made Python run full collections in the middle of them: the
        # status route's p99 roughly doubled under load (bench.api, side by side).
        gc.set_threshold(50_000, 20, 10)
        yield
        await _close_events(app)
        await app.state.async_reads.close()
        db_engine.dispose()

    # Swagger UI (/docs) and ReDoc (/redoc) load their scripts from this process, not from a
    # CDN that a browser behind a firewall cannot reach (the pages were blank there).
    app = FastAPIOffline(
        static_url="/docs/static",
        title="posegen",
        version="0.1.0",
        description="Photo + pose -> avatar, as an asynchronous job queue.",
        lifespan=lifespan,
        # Operation ids are the routes' names (`submit_generation`), as generated clients
        # name their functions after them.
        generate_unique_id_function=lambda route: route.name,
    )
    errors.install(app)
    openapi.install(app)
    app.include_router(health.router)
    app.include_router(generations.router)
    app.include_router(events.router)
    app.include_router(catalog.router)
    playground.install(app)
    app.router.routes.insert(0, poll.ROUTE)  # matched first: see api/poll.py

    # Image + pose image + the form fields.
    app.add_middleware(Observe)
    app.add_middleware(BodyLimit, max_bytes=2 * settings.max_upload_bytes + 64 * 1024)
    _allow_origins(app, settings)
    return app


async def _close_events(app: FastAPI) -> None:
    if app.state.event_hub is not None:
        await app.state.event_hub.close()
    if app.state.dispatcher.events is not None:
        app.state.dispatcher.events.close()  # what is still queued goes out first


def _allow_origins(app: FastAPI, settings: Settings) -> None:
    """CORS for the browser origins in POSEGEN_CORS_ORIGINS (none: no CORS headers). Added
    last, so outermost: a preflight is answered before the body limit or the metrics see it."""
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
            expose_headers=["Location", "Retry-After"],
            max_age=600,
        )


def _active_counts(app: FastAPI) -> Iterable[tuple[str, str, int]]:
    with app.state.sessions() as session:
        rows = session.execute(
            select(Generation.status, Generation.model_key, func.count())
            .where(status_is(Generation.status, "queued", "processing"))
            .group_by(Generation.status, Generation.model_key)
        ).all()
    return [(status, model, int(count)) for status, model, count in rows]
