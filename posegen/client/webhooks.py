"""Checking a webhook's signature on the receiving side (Standard Webhooks)."""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from typing import Any

import standardwebhooks

from posegen.client.errors import WebhookVerificationError


def verify_webhook(secret: str, headers: Mapping[str, str], body: bytes | str) -> dict[str, Any]:
    """The event (`{"type", "timestamp", "data": job}`) when `body` was signed with `secret`
    (the `whsec_…` of `GET /v1/me`) no more than five minutes from now; else
    `WebhookVerificationError`. The check is the reference library's, so it accepts exactly
    what that accepts; malformed headers are refused with the same error instead of the
    library's ValueError."""
    try:
        webhook = standardwebhooks.Webhook(secret)
        event: dict[str, Any] = webhook.verify(body, dict(headers.items()))
    except standardwebhooks.WebhookVerificationError as exc:
        raise WebhookVerificationError(str(exc)) from exc
    except (ValueError, binascii.Error, standardwebhooks.webhooks.EmptyWebhookSecretError) as exc:
        raise WebhookVerificationError(f"malformed webhook or secret: {exc}") from exc
    return event
