"""The API's tests run with no worker: their jobs stay queued and their messages stay on the
broker. A worker another module started (the session-scoped `gpu_worker`) listens on the
shared test broker and would take them, so whether these tests passed depended on the order
the modules ran in. Here `app` publishes to a Redis database no worker listens on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.services import redis_db, settings_from

QUIET_REDIS_URL = redis_db(11)


@pytest.fixture
def app(base_env: dict[str, str], db_engine: object) -> Iterator[object]:
    from fastapi.testclient import TestClient

    from api.app import create_app

    settings = settings_from({**base_env, "POSEGEN_BROKER_URL": QUIET_REDIS_URL})
    try:
        with TestClient(create_app(settings)) as client:
            yield client
    finally:
        redis.Redis.from_url(QUIET_REDIS_URL).flushdb()
