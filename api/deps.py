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


SessionDep = Annotated[Session, Depends(get_session)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]


def current_user(
    session: ReadSessionDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> User:
    return authenticate(session, authorization)


CurrentUser = Annotated[User, Depends(current_user)]


def writing_user(
    session: SessionDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> User:
    # The key is read on the route's own (writing) session: one connection per request. As a
    # dependency it is checked before the form is validated: a bad key is 401, never 422.
    return authenticate(session, authorization)


WritingUser = Annotated[User, Depends(writing_user)]
