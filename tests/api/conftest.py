"""The API's tests run with no worker: their jobs stay queued and their messages stay on the
broker, for the tests to read. `app` publishes to the module's quiet broker, a Redis database no
process consumes (see `quiet_broker_url`), whatever else the module starts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services import settings_from


@pytest.fixture
def app(base_env: dict[str, str], quiet_broker_url: str, db_engine: object) -> Iterator[object]:
    from fastapi.testclient import TestClient

    from api.app import create_app

    settings = settings_from({**base_env, "POSEGEN_BROKER_URL": quiet_broker_url})
    with TestClient(create_app(settings)) as client:
        yield client
