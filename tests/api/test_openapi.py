"""What the OpenAPI schema says that FastAPI alone would not: uploads a generator sends as
files, the server's own error body everywhere, the submit's links, operation ids a generated
client names its functions after. (Whether the server keeps to it: test_schemathesis.py.)"""

from __future__ import annotations

import re


def test_the_schema_is_exact_where_fastapi_is_not(app):
    schema = app.get("/openapi.json").json()
    assert "HTTPValidationError" not in str(schema)
    operations = {
        (method.upper(), path): op
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
    }
    for (method, path), op in operations.items():
        assert op["operationId"] and re.fullmatch(r"[a-z_]+", op["operationId"]), op["operationId"]
        if path.startswith("/v1/"):
            assert {"401", "503"} <= set(op["responses"]), (method, path)
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")) and path.startswith("/v1/"):
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (method, path, status)

    submit = operations[("POST", "/v1/generations")]
    form = submit["requestBody"]["content"]["multipart/form-data"]
    body = schema["components"]["schemas"][form["schema"]["$ref"].rsplit("/", 1)[1]]
    for upload in ("image", "pose_image"):
        assert body["properties"][upload]["format"] == "binary"
        assert form["encoding"][upload]["contentType"] == "image/png, image/jpeg, image/webp"
    assert body["properties"]["num_inference_steps"] == {
        **body["properties"]["num_inference_steps"],
        "minimum": 1,
        "maximum": 150,
    }
    assert body["properties"]["model_key"]["minLength"] == 1
    assert body["not"]["required"] == ["pose_template_id", "pose_image"]
    assert all("anyOf" not in prop for prop in body["properties"].values())  # no null in a form
    links = submit["responses"]["202"]["links"]
    assert {link["operationId"] for link in links.values()} == {
        "get_generation", "cancel_generation", "delete_generation"
    }  # fmt: skip
    assert "Location" in submit["responses"]["202"]["headers"]
    assert set(submit["responses"]) >= {
        "200",
        "202",
        "402",
        "403",
        "409",
        "413",
        "415",
        "422",
        "429",
    }

    listing = operations[("GET", "/v1/generations")]
    status = next(p for p in listing["parameters"] if p["name"] == "status")
    pattern = status["schema"]["pattern"]
    assert re.search(pattern, "completed,failed") and not re.search(pattern, "done")
    assert "422" not in operations[("GET", "/v1/me")]["responses"]  # nothing there to refuse


def test_an_unknown_status_filter_is_refused_as_the_schema_says(app, make_account):
    account = make_account()
    for value, expected in (
        ("completed,failed", 200),
        ("done", 422),
        ("", 422),
        (" completed", 422),
    ):
        response = app.get(f"/v1/generations?status={value}", headers=account.headers)
        assert response.status_code == expected, (value, response.text)
        if expected == 422:
            assert response.json()["error"]["code"] == "invalid_request"


def test_405_names_every_method_of_the_path(app, make_account):
    response = app.request("PUT", "/v1/generations/some-id", headers=make_account().headers)
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET"
