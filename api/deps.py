"""Typed dependency shortcuts, so route signatures read like sentences."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from db.models import User
from posegen.accounts import authenticate
from posegen.queue import Dispatcher
from posegen.settings import Settings
from posegen.storage import Storage

# The dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in
# its thread pool, and each hop costs more than what these functions do.


async def get_session(request: Request) -> AsyncIterator[Session]:
    # Creating a Session does no I/O (it connects on first use, in the route's thread).
    session: Session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.rollback()  # whatever the route did not commit is dropped, outbox too
        session.info.pop("outbox", None)
        session.close()


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


async def current_user(
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> User:
    # A dependency, so the key is checked before the form is validated: a bad key is 401,
    # never 422. Awaited on the event loop, on a connection of the poll's pool that is back
    # in the pool before the route waits for a thread: no thread hop of its own, and no
    # request holds a connection while it waits for a thread.
    return await authenticate(request.app.state.async_reads, authorization)


CurrentUser = Annotated[User, Depends(current_user)]
