"""POSEGEN_CORS_ORIGINS: browser apps on the origins listed may call the API and read the
event stream; with none listed (the default) no CORS header is sent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.factories import submit
from tests.services import settings_from

ORIGIN = "https://app.example.com"


@pytest.fixture
def cors_app(
    base_env: dict[str, str], quiet_broker_url: str, db_engine: object
) -> Iterator[object]:
    from fastapi.testclient import TestClient

    from api.app import create_app

    env = {
        **base_env,
        "POSEGEN_BROKER_URL": quiet_broker_url,
        "POSEGEN_CORS_ORIGINS": f"{ORIGIN}/, https://other.example.com",
    }
    with TestClient(create_app(settings_from(env))) as client:
        yield client


def test_listed_origins_may_call_the_api(cors_app, make_account):
    account = make_account()
    preflight = cors_app.options(
        "/v1/generations",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, idempotency-key",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "idempotency-key" in preflight.headers["access-control-allow-headers"].lower()
    job = submit(cors_app, account, headers={"Origin": ORIGIN})
    assert job.headers["access-control-allow-origin"] == ORIGIN
    assert "location" in job.headers["access-control-expose-headers"].lower()
    events = cors_app.options(
        f"/v1/generations/{job.json()['id']}/events",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization, last-event-id"},
    )  # fmt: skip
    assert events.status_code == 200


def test_other_origins_get_no_cors_headers(cors_app):
    answer = cors_app.get("/health", headers={"Origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in answer.headers
    preflight = cors_app.options(
        "/v1/generations",
        headers={"Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 400


def test_no_origins_no_cors_headers(app):
    answer = app.get("/health", headers={"Origin": ORIGIN})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
    preflight = app.options(
        "/v1/generations", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers
