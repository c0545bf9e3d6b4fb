"""`verify_webhook` accepts exactly what the Standard Webhooks reference library accepts, and
refuses everything else with its own error (never a ValueError of a malformed header)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time

import pytest
import standardwebhooks
from hypothesis import given, settings
from hypothesis import strategies as st

from posegen import accounts
from posegen.client import WebhookVerificationError, verify_webhook

SECRET = accounts.new_webhook_secret()
OTHER = accounts.new_webhook_secret()
BODY = json.dumps({"type": "generation.completed", "data": {"id": "j1", "status": "completed"}})


def _signature(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    when = dt.datetime.fromtimestamp(timestamp, tz=dt.UTC)
    return standardwebhooks.Webhook(secret).sign(msg_id, when, body)


def test_a_signed_event_verifies_and_is_returned():
    now = int(time.time())
    headers = {
        "Webhook-Id": "msg_1",
        "Webhook-Timestamp": str(now),
        "Webhook-Signature": _signature(SECRET, "msg_1", now, BODY),
    }
    assert verify_webhook(SECRET, headers, BODY.encode()) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(OTHER, headers, BODY.encode())
    with pytest.raises(WebhookVerificationError):
        verify_webhook(SECRET, headers, BODY.replace("completed", "failed"))


signatures = st.sampled_from(["valid", "two", "v2", "no-comma", "bad-base64", "other-secret", ""])
offsets = st.sampled_from([-86_400, -400, -200, 0, 200, 400, 86_400])


@settings(max_examples=300, deadline=None)
@given(
    signature=signatures,
    offset=offsets,
    msg_id=st.sampled_from(["msg_1", ""]),
    timestamp_text=st.sampled_from(["number", "junk", ""]),
    secret=st.sampled_from([SECRET, OTHER, "whsec_", "not base64 at all!"]),
    tamper=st.booleans(),
    as_bytes=st.booleans(),
)
def test_agrees_with_the_reference_library(
    signature, offset, msg_id, timestamp_text, secret, tamper, as_bytes
):
    timestamp = int(time.time()) + offset
    valid = _signature(SECRET, msg_id or "x", timestamp, BODY)
    header = {
        "valid": valid,
        "two": f"v1,{base64.b64encode(b'nope').decode()} {valid}",
        "v2": valid.replace("v1,", "v2,"),
        "no-comma": valid.replace(",", ""),
        "bad-base64": "v1,@@@",
        "other-secret": _signature(OTHER, msg_id or "x", timestamp, BODY),
        "": "",
    }[signature]
    stamp = {"number": str(timestamp), "junk": "yesterday", "": ""}[timestamp_text]
    headers = {"webhook-id": msg_id, "webhook-timestamp": stamp, "webhook-signature": header}
    body = BODY + (" " if tamper else "")
    payload = body.encode() if as_bytes else body
    try:
        expected = standardwebhooks.Webhook(secret).verify(payload, headers)
    except Exception:  # the library's refusals include ValueError and binascii.Error
        expected = None
    try:
        got = verify_webhook(secret, headers, payload)
    except WebhookVerificationError:
        got = None
    assert got == expected
