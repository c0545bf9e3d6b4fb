"""Status codes and error bodies a client can rely on."""

from __future__ import annotations

import pytest

from db.models import AiModel
from tests.factories import png_bytes, submit


def _error(response):
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    return body["error"]["code"]


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic abc", "Bearer "])
def test_missing_or_invalid_key_is_401(app, header):
    headers = {"Authorization": header} if header else {}
    response = app.get("/v1/me", headers=headers)
    assert response.status_code == 401 and _error(response) == "unauthorized"


@pytest.mark.parametrize("header", [None, "Bearer nope"])
def test_a_bad_key_is_401_before_the_form_is_checked(app, header):
    """An empty submit form would be 422; without a valid key the answer is 401 all the same."""
    headers = {"Authorization": header} if header else {}
    response = app.post("/v1/generations", headers=headers)
    assert response.status_code == 401 and _error(response) == "unauthorized"


def test_revoked_key_is_401(app, make_account, sessions):
    from posegen import accounts

    account = make_account()
    with sessions() as s:
        accounts.revoke_key(s, key_id_or_prefix=account.key[:14])
        s.commit()
    response = app.get("/v1/me", headers=account.headers)
    assert response.status_code == 401 and "revoked" in response.json()["error"]["message"]


def test_insufficient_credits_is_402_and_records_nothing(app, make_account):
    account = make_account(credits=0)
    response = submit(app, account)
    assert response.status_code == 402 and _error(response) == "insufficient_credits"
    assert app.get("/v1/generations", headers=account.headers).json()["items"] == []


def test_tier_and_availability(app, make_account):
    free = make_account(tier="free")
    response = submit(app, free, model_key="sdxl-openpose")
    assert response.status_code == 403 and _error(response) == "tier_required"
    enterprise = make_account(tier="enterprise")
    response = submit(app, enterprise, model_key="sd35-canny")
    assert response.status_code == 409 and _error(response) == "model_unavailable"


def test_disabled_model_is_409(app, make_account, session):
    session.add(
        AiModel(
            model_key="test-disabled",
            name="x",
            provider="local",
            author="x",
            family="sd15",
            base_model="tiny-sd15",
            controlnet_model="tiny-sd15-controlnet",
            tier="free",
            credit_cost=1,
            resolution="128x128",
            quality="x",
            priority=5,
            default_steps=2,
            guidance_scale=7.0,
            default_prompt="x",
            negative_prompt="",
            processing_time="x",
            enabled=False,
            coming_soon=False,
        )
    )
    session.commit()
    response = submit(app, make_account(), model_key="test-disabled")
    assert response.status_code == 409 and _error(response) == "model_unavailable"


@pytest.mark.parametrize(
    ("fields", "files"),
    [
        ({"model_key": "no-such-model"}, None),
        ({"pose_template_id": "no-such-pose"}, None),
        ({}, {"pose_image": ("p.png", png_bytes(), "image/png")}),  # both pose fields
        ({"num_inference_steps": "0"}, None),
        ({"num_inference_steps": "151"}, None),
        ({"guidance_scale": "31"}, None),
        ({"strength": "1.5"}, None),
        ({"strength": "nan"}, None),
        ({"controlnet_conditioning_scale": "-1"}, None),
        ({"seed": "-1"}, None),
        ({"seed": "abc"}, None),
        ({"prompt": "x" * 1001}, None),
        ({"webhook_url": "ftp://example.com/hook"}, None),
    ],
)
def test_invalid_requests_are_422(app, make_account, fields, files):
    response = submit(app, make_account(), files=files, **fields)
    assert response.status_code == 422, response.text
    assert _error(response) == "invalid_request"


def test_missing_image_is_422(app, make_account):
    account = make_account()
    response = app.post(
        "/v1/generations", headers=account.headers, data={"model_key": "tiny-sd15-openpose"}
    )
    assert response.status_code == 422 and _error(response) == "invalid_request"


def test_unknown_route_has_the_error_body(app):
    response = app.get("/v1/nothing-here")
    assert response.status_code == 404 and _error(response) == "not_found"


@pytest.mark.parametrize("field", ["model_key", "prompt", "negative_prompt", "pose_template_id"])
def test_nul_bytes_are_422_not_500(app, make_account, field):
    response = submit(app, make_account(), **{field: "a\x00b"})
    assert response.status_code == 422 and _error(response) == "invalid_request"


def test_forged_cursor_is_422(app, make_account):
    import base64

    forged = base64.urlsafe_b64encode(b"2026-01-01T00:00:00+00:00|\x00nope").decode()
    response = app.get(f"/v1/generations?cursor={forged}", headers=make_account().headers)
    assert response.status_code == 422 and _error(response) == "invalid_request"
