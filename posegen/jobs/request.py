"""What a caller asks for: a generation request, its checks and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from posegen.errors import InvalidRequest
from posegen.params import GenerationParams
from posegen.webhooks import parse_choices

MAX_PROMPT_CHARS = 1000
MAX_DEADLINE_SECONDS = 86_400
# Fields added since idempotency keys were first stored, with their defaults.
ADDED_DEFAULTS: dict[str, object] = {
    "deadline_seconds": None, "webhook_events": None, "output_format": "png",
    "output_quality": 90, "preview": False, "num_outputs": 1,
}  # fmt: skip


@dataclass(frozen=True)
class GenerationRequest:
    """What a caller asks for. The parameters' bounds are checked as `params` is built; the
    rest by `validate`."""

    model_key: str
    image: bytes
    prompt: str | None = None
    negative_prompt: str | None = None
    pose_template_id: str | None = None
    pose_image: bytes | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    webhook_url: str | None = None
    webhook_events: str | None = None  # a comma list of posegen.webhooks.CHOICES
    # Not completed this many seconds after submit: failed with `deadline_exceeded`.
    deadline_seconds: int | None = None

    def validate(self) -> None:
        for name in ("model_key", "prompt", "negative_prompt", "pose_template_id", "webhook_url"):
            value = getattr(self, name)
            if value is not None and "\x00" in value:
                raise InvalidRequest(f"{name} contains a NUL character.")
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if value is not None and len(value) > MAX_PROMPT_CHARS:
                raise InvalidRequest(f"{name} is longer than {MAX_PROMPT_CHARS} characters.")
        if self.deadline_seconds is not None and not (
            1 <= self.deadline_seconds <= MAX_DEADLINE_SECONDS
        ):
            raise InvalidRequest(f"deadline_seconds must be 1 to {MAX_DEADLINE_SECONDS}.")
        if self.pose_template_id and self.pose_image is not None:
            raise InvalidRequest("Send at most one of pose_template_id and pose_image.")
        if self.webhook_events and not self.webhook_url:
            raise InvalidRequest("webhook_events needs a webhook_url.")
        parse_choices(self.webhook_events)

    def fingerprint(self) -> str:
        """A digest of everything that defines the request (images by their hash)."""
        # The parameters sit beside the other fields, as they did before they had a model of
        # their own: the digests of stored idempotency keys stay valid.
        fields = {**asdict(self), **self.params.model_dump()}
        del fields["params"]
        # Fields added since, left at their defaults, are left out too: the digest of a
        # request that does not use them is what it was before they existed.
        for name, default in ADDED_DEFAULTS.items():
            if fields[name] == default:
                del fields[name]
        for name in ("image", "pose_image"):
            raw = fields[name]
            fields[name] = hashlib.sha256(raw).hexdigest() if raw is not None else None
        blob = json.dumps(fields, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()
