"""The OpenAPI schema as exact as the server, for generated clients and schemathesis.

FastAPI derives most of it from the routes. What it cannot say is filled in here, once, when
the schema is first asked for: every `/v1` route's 401 and 503; no 422 where no value can be
refused, and FastAPI's `HTTPValidationError` nowhere (this API never sends it); uploads as
`format: binary` (generators such as openapi-python-client send a file only then, not the
3.1 `contentMediaType` alone) of the image types the server takes; form fields and parameters
without the `null` that neither can carry; and the parameters folded into the form's own schema.
The routes state their own errors with `documented` and the submit's links with
`JOB_LINKS`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from api.schemas import ErrorResponse

ERROR_CODES = {
    401: "`unauthorized`: the key is missing, unknown or revoked.",
    402: "`insufficient_credits`: the balance is below the model's price.",
    403: "`tier_required`: the model needs a higher tier.",
    404: "`not_found` (another user's job too).",
    409: "`model_unavailable` (submit: disabled or coming soon) or `already_finished` (cancel).",
    413: "`payload_too_large`: an upload over POSEGEN_MAX_UPLOAD_BYTES.",
    415: "`unsupported_image`: not PNG, JPEG or WebP, corrupt, or too many pixels.",
    422: "`invalid_request`, or `idempotency_key_reused` for a key sent with another request.",
    429: "`rate_limited` or `queue_full`; wait for Retry-After.",
    503: "`unavailable`: a dependency is down and nothing was charged; wait for Retry-After.",
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}
IMAGE_TYPES = "image/png, image/jpeg, image/webp"
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}

# From a submit's answer to the job's own routes (schemathesis' stateful phase follows them).
_JOB_ID = {"job_id": "$response.body#/id"}
JOB_LINKS = {
    "GetGeneration": {"operationId": "get_generation", "parameters": _JOB_ID},
    "CancelGeneration": {"operationId": "cancel_generation", "parameters": _JOB_ID},
    "DeleteGeneration": {"operationId": "delete_generation", "parameters": _JOB_ID},
}  # not its outputs: they exist once it completed, not when it is made


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that answers these error statuses."""
    return {status: _error(status) for status in statuses}


def _error(status: int) -> dict[str, Any]:
    extra = {"headers": RETRY_AFTER} if status in (429, 503) else {}
    return {"model": ErrorResponse, "description": ERROR_CODES[status], **extra}


def install(app: FastAPI) -> None:
    """Make `app.openapi()` answer the exact schema (built on first use, as FastAPI does)."""
    derive = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _make_exact(derive())
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _make_exact(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            if path.startswith("/v1/"):
                for status in (401, 503):
                    responses.setdefault(str(status), _response(status))
            if "422" in responses and _is_fastapi_validation(responses["422"]):
                # FastAPI documents a 422 for every route with a parameter, even one that no
                # value fails (a job id: any string is looked up, a 404 at worst) or a hidden
                # one (the key's header). A route that can refuse a value says so itself.
                del responses["422"]
            for parameter in operation.get("parameters", []):
                parameter["schema"] = _without_null(parameter["schema"])
            body = operation.get("requestBody", {}).get("content", {})
            if "multipart/form-data" in body:
                _exact_form(body["multipart/form-data"], components)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def _response(status: int) -> dict[str, Any]:
    response = {
        "description": ERROR_CODES[status],
        "content": {"application/json": {"schema": ERROR_REF}},
    }
    if status in (429, 503):
        response["headers"] = RETRY_AFTER
    return response


def _is_fastapi_validation(response: dict[str, Any]) -> bool:
    ref = response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
    return bool(ref and ref.endswith("/HTTPValidationError"))


def _exact_form(media: dict[str, Any], components: dict[str, Any]) -> None:
    # The route's own keywords for its form (`openapi_extra`) sit beside the $ref.
    ref = media["schema"].pop("$ref")
    form = components[ref.rsplit("/", 1)[1]]
    form.update(media["schema"])
    media["schema"] = {"$ref": ref}
    properties: dict[str, Any] = {}
    for part in form.pop("allOf", []):  # a model taken as form fields (the parameters)
        properties |= components[part["$ref"].rsplit("/", 1)[1]]["properties"]
    properties |= form["properties"]
    encoding = {}
    for name, prop in properties.items():
        properties[name] = prop = _without_null(prop)
        if prop.get("contentMediaType"):
            properties[name] = {
                "type": "string",
                "format": "binary",
                "minLength": 1,
                **{k: prop[k] for k in ("title", "description") if k in prop},
            }
            encoding[name] = {"contentType": IMAGE_TYPES}
    form["properties"] = properties
    media["encoding"] = encoding


def _without_null(prop: dict[str, Any]) -> dict[str, Any]:
    """`anyOf: [X, null]` as X: a form field or a parameter is left out, never sent as null."""
    variants = prop.get("anyOf")
    if not variants or {"type": "null"} not in variants or len(variants) != 2:
        return prop
    kept = next(v for v in variants if v != {"type": "null"})
    rest = {k: v for k, v in prop.items() if k != "anyOf"}
    if rest.get("default", ...) is None:
        del rest["default"]
    return {**kept, **rest}
