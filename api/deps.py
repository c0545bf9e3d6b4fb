"""Typed dependency shortcuts, so route signatures read like sentences."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Response
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from api.fleet import Fleet
from db.models import User
from posegen.accounts import authenticate
from posegen.queue import Dispatcher, discard
from posegen.settings import Settings
from posegen.storage import Storage

# The dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in
# its thread pool, and each hop costs more than what these functions do.


async def get_session(request: Request) -> AsyncIterator[Session]:
    # Creating a Session does no I/O (it connects on first use, in the route's thread).
    # The route commits with `Dispatcher.commit` (on its thread, before it answers); whatever
    # it did not commit is dropped here, its deferred messages too.
    session: Session = request.app.state.sessions()
    try:
        yield session
    finally:
        discard(session)


async def get_read_session(request: Request) -> AsyncIterator[Session]:
    """A session for reads only, on an autocommit connection: no BEGIN and no ROLLBACK round
    trips around the queries of a poll."""
    session: Session = request.app.state.read_sessions()
    try:
        yield session
    finally:
        session.close()


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


async def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


async def get_fleet(request: Request) -> Fleet:
    fleet: Fleet = request.app.state.fleet
    return fleet


# A pooled connection is never held by a request that waits for a thread: with every thread
# waiting for a connection and every connection held by a request waiting for a thread, the
# API would stall until the pool's timeout (40 clients did that to 8 threads). So the sessions
# close as soon as the route function returns (scope="function": before a FileResponse reads
# its file on a thread), and the key is read on the event loop on a connection of its own,
# returned before the route waits for its thread (`current_user`).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
ReadSessionDep = Annotated[Session, Depends(get_read_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
FleetDep = Annotated[Fleet, Depends(get_fleet)]


class KeyFirstRoute(APIRoute):
    """A route that checks the API key from the headers before it reads the body: FastAPI
    receives and parses a whole form before it solves any dependency, so a caller with a
    missing or unknown key could make the API take in a 10 MB upload only to answer 401.

    Awaited on the event loop, on a connection of the async pool that is back in the pool
    before the route waits for a thread: no thread hop of its own, and no request holds a
    connection while it waits for a thread. Errors go through the app's handlers (401, 503)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def key_first(request: Request) -> Response:
            request.state.user = await authenticate(
                request.app.state.async_reads, request.headers.get("authorization")
            )
            return await handle(request)

        return key_first


async def current_user(
    request: Request,
    # Documents nothing (the key is read by `KeyFirstRoute`); kept so that a route's
    # signature still says it takes a key.
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> User:
    user: User | None = getattr(request.state, "user", None)
    if user is None:  # a route outside a `KeyFirstRoute` router
        user = await authenticate(request.app.state.async_reads, authorization)
    return user


CurrentUser = Annotated[User, Depends(current_user)]
