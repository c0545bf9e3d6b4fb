"""The unit of work every door runs (`posegen.queue.unit_of_work`), through the CLI's: what
the domain wrote and the messages it deferred go out together after the commit, or neither."""

from __future__ import annotations

import uuid

import pytest
import typer
from sqlalchemy import select

from db.models import User
from posegen import accounts
from posegen.cli import common
from posegen.errors import InvalidRequest
from posegen.queue import Message, defer, ready_message
from posegen.settings import get_settings
from tests.broker_messages import waiting_job_ids


@pytest.fixture
def cli_env(monkeypatch, base_env, quiet_broker_url, db_engine):
    """The CLI's settings, on the quiet broker: no worker takes what the command published."""
    for name, value in {**base_env, "POSEGEN_BROKER_URL": quiet_broker_url}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _message(job_id: str) -> Message:
    return ready_message("tiny-sd15-openpose", get_settings(), job_id=job_id)


def test_a_command_publishes_what_it_deferred_after_its_commit(cli_env, quiet_broker_url, sessions):
    job_id = str(uuid.uuid4())
    with common.unit_of_work() as session:
        user = accounts.create_user(session, email="cli-uow@example.com")
        defer(session, _message(job_id))
        assert waiting_job_ids(quiet_broker_url) == []  # not before the commit
    with sessions() as s:
        assert s.get(User, user.id) is not None
    assert waiting_job_ids(quiet_broker_url) == [job_id]


def test_a_failed_command_writes_and_publishes_nothing(cli_env, quiet_broker_url, sessions):
    job_id = str(uuid.uuid4())
    with pytest.raises(typer.Exit), common.unit_of_work() as session:
        accounts.create_user(session, email="cli-uow-failed@example.com")
        defer(session, _message(job_id))
        raise InvalidRequest("refused")
    with sessions() as s:
        found = s.scalar(select(User).where(User.email == "cli-uow-failed@example.com"))
        assert found is None
    assert waiting_job_ids(quiet_broker_url) == []
