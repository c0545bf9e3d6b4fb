"""Schemathesis hooks for tests/api/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

What no JSON schema can say, told to the generator: real images for the upload fields; and,
in requests meant to be valid, a model, a pose template and a webhook URL that exist (the
catalog lives in the database, URLs must resolve), and an Idempotency-Key not already used
with another request. A cursor is opaque: a valid one is only ever one the API gave, so
made-up cursors are dropped from valid requests and real ones reach the list through the
schema's NextPage link.

Four kinds of report are dropped, each for a reason that is not the API's:
- "schema-violating request accepted" where the form sent does conform: the generator filled
  the one invalid field of a body it meant to be invalid with a value it took from an earlier
  response (a model key, a pose template's id), or sent a sample file where it had generated
  an invalid value for a file field;
- "schema-valid request rejected" where the form sent does not conform: the same filling put
  a pose template's id beside a pose image (the schema's `not` forbids both), or a file went
  out empty, or as another type than the encoding's (a GIF labelled image/png);
- "created resource not found" for what a worker makes once it runs the job (its outputs, the
  pose it drew, its previews): they do not exist when the job was just submitted;
- "deleted resource still available" for the job itself and its event stream:
  `DELETE /v1/generations/{id}` deletes the job's photos and outputs, and the job stays, with
  `deleted_at` (the contract's words); its outputs do answer 404 afterwards, and that is still
  checked."""

from __future__ import annotations

import base64
import datetime as dt
import email.parser
import email.policy
import hashlib
import io
import os
import re
import uuid

import jsonschema
import requests
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.core.failures import AcceptedNegativeData, Failure
from schemathesis.core.parameters import ParameterLocation
from schemathesis.openapi.checks import (
    EnsureResourceAvailability,
    RejectedPositiveData,
    UseAfterFree,
)

MODELS = os.environ["POSEGEN_SCHEMATHESIS_MODELS"].split(",")
POSES = os.environ["POSEGEN_SCHEMATHESIS_POSES"].split(",")
WEBHOOK_URL = os.environ["POSEGEN_SCHEMATHESIS_WEBHOOK"]


@st.composite
def _image(draw: st.DrawFn, fmt: str) -> bytes:
    size = (draw(st.integers(8, 96)), draw(st.integers(8, 96)))
    color = tuple(draw(st.integers(0, 255)) for _ in range(3))
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


for media_type, fmt in (("image/png", "PNG"), ("image/jpeg", "JPEG"), ("image/webp", "WEBP")):
    schemathesis.openapi.media_type(media_type, _image(fmt))


def _pick(choices: list[str], generated: str) -> str:
    # Deterministic in the generated value, so that a failure replays the same request.
    return choices[int(hashlib.sha256(generated.encode()).hexdigest(), 16) % len(choices)]


def _positive(case: schemathesis.Case, where: ParameterLocation) -> bool:
    info = case.meta.components.get(where) if case.meta else None
    return info is not None and info.mode.is_positive


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    label = case.operation.label
    if label == "POST /v1/generations" and _positive(case, ParameterLocation.BODY):
        body = case.body
        if isinstance(body, dict):
            if isinstance(body.get("model_key"), str):
                body["model_key"] = _pick(MODELS, body["model_key"])
            if body.get("pose_template_id"):
                body["pose_template_id"] = _pick(POSES, body["pose_template_id"])
            if body.get("webhook_url"):
                body["webhook_url"] = WEBHOOK_URL
            key = (case.headers or {}).get("idempotency-key")
            if key and _positive(case, ParameterLocation.HEADER):
                digest = hashlib.sha256(repr(sorted(body.items())).encode()).hexdigest()[:16]
                case.headers["idempotency-key"] = f"{key[:200]}-{digest}"
    if label == "GET /v1/generations" and _positive(case, ParameterLocation.QUERY):
        query = case.query
        if isinstance(query, dict) and not _given_by_the_api(query.get("cursor")):
            query.pop("cursor", None)
    return case


def _given_by_the_api(cursor: object) -> bool:
    """Whether `cursor` is one the API could have made (base64 of "<time>|<job id>")."""
    if not isinstance(cursor, str):
        return False
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, job_id = raw.partition("|")
        return dt.datetime.fromisoformat(created).tzinfo is not None and bool(uuid.UUID(job_id))
    except ValueError:
        return False


@schemathesis.hook
def filter_failure(
    context: schemathesis.HookContext,
    failure: Failure,
    case: schemathesis.Case,
    response: schemathesis.Response,
) -> bool:
    if isinstance(failure, UseAfterFree):
        return not JOB_STAYS.fullmatch(failure.usage)
    if isinstance(failure, EnsureResourceAvailability):
        return not MADE_BY_THE_WORKER.fullmatch(failure.not_available_with)
    if isinstance(failure, AcceptedNegativeData) and _only_the_body_was_negated(case):
        return not _body_conforms(case, response)
    if isinstance(failure, RejectedPositiveData) and isinstance(case.body, dict):
        return _body_conforms(case, response)
    return True


# After a DELETE the job stays (its files go): the job and its event stream still answer.
JOB_STAYS = re.compile(r"GET /v1/generations/[^/]+(/events)?")
# What a worker makes once it runs the job: not there when the job was just submitted.
MADE_BY_THE_WORKER = re.compile(r"GET /v1/generations/[^/]+/(outputs/[^/]+|pose|preview)")


def _only_the_body_was_negated(case: schemathesis.Case) -> bool:
    components = case.meta.components if case.meta else {}
    negated = {where for where, info in components.items() if info.mode.is_negative}
    return negated == {ParameterLocation.BODY}


def _body_conforms(case: schemathesis.Case, response: schemathesis.Response) -> bool:
    """Whether the form that was sent conforms to the schema. Its files are taken from the
    wire, as schemathesis may send a sample file where it generated another value: for the
    schema a file is a string of its bytes (`format: binary`, `minLength`)."""
    raw = case.operation.schema.raw_schema
    media = raw["paths"][case.operation.path][case.method.lower()]["requestBody"]["content"]
    body_schema = media[case.media_type]["schema"]
    form = raw["components"]["schemas"][body_schema["$ref"].rsplit("/", 1)[1]]
    binary = {name for name, prop in form["properties"].items() if prop.get("format") == "binary"}
    body = {k: v for k, v in case.body.items() if k not in binary}
    for name, data in _files_sent(response.request).items():
        if name in binary:
            # Of the encoding's types (PNG, JPEG, WebP), else not what the schema allows.
            body[name] = "x" * len(data) if _image_type(data) else None
    validator = jsonschema.Draft202012Validator({**body_schema, "components": raw["components"]})
    return validator.is_valid(body)


def _files_sent(request: requests.PreparedRequest) -> dict[str, bytes]:
    """Each file part of the multipart body that was sent, by its field name."""
    content = request.body if isinstance(request.body, bytes) else b""
    head = f"Content-Type: {request.headers.get('Content-Type', '')}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + content)
    files = {}
    for part in message.iter_parts() if message.is_multipart() else ():
        if part.get_filename() is not None:
            files[part.get_param("name", header="content-disposition")] = (
                part.get_payload(decode=True) or b""
            )
    return files


def _image_type(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None
