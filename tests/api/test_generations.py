"""The submit/poll/list/cancel/output routes against Postgres and Redis (no worker: see
tests/api/conftest.py)."""

from __future__ import annotations

import uuid

from db.models import Generation
from posegen import credits
from tests.broker_messages import waiting_job_ids
from tests.factories import png_bytes, submit

JOB_KEYS = {
    "id", "status", "model_key", "prompt", "negative_prompt", "params", "pose_source",
    "pose_template_id", "credit_cost", "progress", "queue_position", "queue_position_capped",
    "eta_seconds", "outputs",
    "error", "webhook_url", "webhook_events", "attempts", "created_at", "started_at",
    "finished_at", "deleted_at", "routed_to",
}  # fmt: skip


def test_submit_records_charges_and_enqueues(app, make_account, session, quiet_broker_url):
    account = make_account(credits=5)
    response = submit(app, account, prompt="an astronaut", seed=7, num_inference_steps=3)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/generations/{job['id']}"
    assert set(job) == JOB_KEYS
    assert job["status"] == "queued" and job["queue_position"] == 0
    assert job["params"] == {
        "num_inference_steps": 3, "guidance_scale": 7.5, "controlnet_conditioning_scale": 1.0,
        "strength": 0.75, "seed": 7, "width": 128, "height": 128,
        "output_format": "png", "output_quality": 90, "preview": False, "num_outputs": 1,
    }  # fmt: skip
    assert job["pose_source"] == "template" and job["credit_cost"] == 1
    assert (
        job["progress"] == {"step": 0, "total": 0} and job["outputs"] == [] and job["error"] is None
    )
    # Charged in the same transaction, recorded in the ledger, message on the Redis queue.
    assert app.get("/v1/me", headers=account.headers).json()["credits"] == 4
    assert credits.ledger_sum(session, user_id=account.user_id) == 4
    assert waiting_job_ids(quiet_broker_url) == [job["id"]]  # one message, this job's
    assert session.get(Generation, job["id"]).input_key == f"inputs/{job['id']}/image.png"


def test_defaults_come_from_the_model(app, make_account):
    job = submit(app, make_account(), pose_template_id=None).json()
    assert job["prompt"] == "a portrait avatar of a person"
    assert job["negative_prompt"] == "blurry"
    assert job["params"]["num_inference_steps"] == 2 and 0 <= job["params"]["seed"] < 2**32
    assert job["pose_source"] == "image"


def test_queue_position_counts_jobs_ahead(app, make_account):
    account = make_account()
    ids = [submit(app, account).json()["id"] for _ in range(3)]
    positions = [
        app.get(f"/v1/generations/{i}", headers=account.headers).json()["queue_position"]
        for i in ids
    ]
    assert positions == [0, 1, 2]


def test_list_is_newest_first_and_paginates(app, make_account):
    account = make_account()
    ids = [submit(app, account).json()["id"] for _ in range(5)]
    page1 = app.get("/v1/generations?limit=2", headers=account.headers).json()
    page2 = app.get(
        f"/v1/generations?limit=2&cursor={page1['next_cursor']}", headers=account.headers
    ).json()
    page3 = app.get(
        f"/v1/generations?limit=2&cursor={page2['next_cursor']}", headers=account.headers
    ).json()
    seen = [j["id"] for j in page1["items"] + page2["items"] + page3["items"]]
    assert seen == list(reversed(ids)) and page3["next_cursor"] is None
    queued = app.get("/v1/generations?status=queued", headers=account.headers).json()
    assert len(queued["items"]) == 5
    assert (
        app.get("/v1/generations?status=completed", headers=account.headers).json()["items"] == []
    )


def test_cancel_queued_job_refunds_once(app, make_account, session):
    account = make_account(credits=3)
    job = submit(app, account).json()
    canceled = app.post(f"/v1/generations/{job['id']}/cancel", headers=account.headers)
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    again = app.post(f"/v1/generations/{job['id']}/cancel", headers=account.headers)
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_finished"
    assert app.get("/v1/me", headers=account.headers).json()["credits"] == 3
    assert credits.ledger_sum(session, user_id=account.user_id) == 3


def test_bad_upload_is_415_with_the_error_body(app, make_account):
    response = submit(app, make_account(), image=b"this is not an image")
    assert response.status_code == 415
    assert response.json() == {
        "error": {
            "code": "unsupported_image",
            "message": "The image is not a PNG, JPEG or WebP image.",
        }
    }


def test_other_users_job_is_not_found(app, make_account):
    owner, other = make_account(), make_account()
    job = submit(app, owner).json()
    for method, path in (
        ("get", f"/v1/generations/{job['id']}"),
        ("post", f"/v1/generations/{job['id']}/cancel"),
        ("get", f"/v1/generations/{job['id']}/outputs/0"),
    ):
        response = getattr(app, method)(path, headers=other.headers)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert app.get(f"/v1/generations/{uuid.uuid4()}", headers=owner.headers).status_code == 404
    assert app.get("/v1/generations/not-a-uuid", headers=owner.headers).status_code == 404


def test_catalog_templates_and_me(app, make_account):
    account = make_account(tier="basic", credits=42)
    models = {
        m["model_key"]: m for m in app.get("/v1/models", headers=account.headers).json()["items"]
    }
    assert set(models) == {
        "sd15-openpose",
        "sdxl-openpose",
        "sdxl-openpose-ultra",
        "sd35-canny",
        "tiny-sd15-openpose",
        "tiny-sdxl-openpose",
        "sd15-openpose-hf",
        "sdxl-openpose-hf",
        "sdxl-openpose-ultra-hf",
    }
    assert models["sd35-canny"]["coming_soon"] and not models["sd35-canny"]["enabled"]
    # Where each runs, and who made it: the hosted twins cost what their local twins do.
    local, hosted = models["sdxl-openpose"], models["sdxl-openpose-hf"]
    assert (local["provider"], local["author"], local["remote_model"]) == ("local", "thibaud", None)
    assert (hosted["provider"], hosted["author"]) == ("huggingface", "thibaud")
    assert hosted["remote_model"] == "thibaud/controlnet-openpose-sdxl-1.0"
    for key in ("sd15-openpose", "sdxl-openpose", "sdxl-openpose-ultra"):
        twin = models[f"{key}-hf"]
        assert (twin["tier"], twin["credit_cost"]) == (
            models[key]["tier"],
            models[key]["credit_cost"],
        )
        assert models[key]["fallback_model_key"] is None  # off unless configured
    assert (
        models["sdxl-openpose"]["credit_cost"] == 5
        and models["sdxl-openpose"]["resolution"] == "1024x1024"
    )
    poses = app.get("/v1/pose-templates", headers=account.headers).json()["items"]
    assert {"standing", "arms-crossed", "waving", "hands-on-hips"} <= {p["key"] for p in poses}
    assert all(len(p["keypoints"]) == 18 for p in poses)
    me = app.get("/v1/me", headers=account.headers).json()
    assert me["email"] == account.email and me["tier"] == "basic" and me["credits"] == 42
    assert me["webhook_secret"].startswith("whsec_")


def test_template_by_id_and_pose_image(app, make_account):
    account = make_account()
    template = app.get("/v1/pose-templates", headers=account.headers).json()["items"][0]
    by_id = submit(app, account, pose_template_id=template["id"]).json()
    assert by_id["pose_template_id"] == template["id"]
    with_pose = submit(
        app,
        account,
        pose_template_id=None,
        files={"pose_image": ("pose.png", png_bytes(), "image/png")},
    ).json()
    assert with_pose["pose_source"] == "pose_image"


def test_health_ready_metrics(app, make_account):
    assert app.get("/health").json() == {"status": "ok"}
    ready = app.get("/ready")
    assert ready.status_code == 200, ready.text
    assert {k: v["ok"] for k, v in ready.json()["checks"].items()} == {
        "database": True,
        "broker": True,
        "storage": True,
    }
    submit(app, make_account())
    text = app.get("/metrics").text
    assert 'posegen_submits_total{status="202"}' in text
    assert 'posegen_jobs_active{model="tiny-sd15-openpose",status="queued"} 1.0' in text


def test_the_poll_answers_before_fastapi_routing_as_documented(app, make_account):
    """The poll is a plain route matched first (`POLL_ROUTE`): same answers, same errors,
    same metrics label, same methods, and still in the OpenAPI schema."""
    from api.poll import ROUTE as POLL_ROUTE

    assert app.app.router.routes[0] is POLL_ROUTE
    account = make_account()
    job = submit(app, account).json()
    polled = app.get(f"/v1/generations/{job['id']}", headers=account.headers)
    assert polled.status_code == 200 and polled.json() == {**job, "eta_seconds": None}
    assert polled.headers["content-type"] == "application/json"
    missing = app.get("/v1/generations/not-a-uuid", headers=account.headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert app.get(f"/v1/generations/{job['id']}").json()["error"]["code"] == "unauthorized"
    assert app.head(f"/v1/generations/{job['id']}", headers=account.headers).status_code == 405
    schema = app.get("/openapi.json").json()
    assert "get" in schema["paths"]["/v1/generations/{job_id}"]
    text = app.get("/metrics").text
    assert 'route="/v1/generations/{job_id}"' in text and 'status="404"' in text
