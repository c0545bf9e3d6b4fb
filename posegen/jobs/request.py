"""What a caller asks for: a generation request, its bounds and its fingerprint."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

from posegen.errors import InvalidRequest

MAX_PROMPT_CHARS = 1000


@dataclass(frozen=True)
class GenerationRequest:
    """What a caller asks for; bounds are checked by `validate`."""

    model_key: str
    image: bytes
    prompt: str | None = None
    negative_prompt: str | None = None
    pose_template_id: str | None = None
    pose_image: bytes | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    controlnet_conditioning_scale: float = 1.0
    strength: float = 0.75
    seed: int | None = None
    webhook_url: str | None = None

    def validate(self) -> None:
        for name in ("model_key", "prompt", "negative_prompt", "pose_template_id", "webhook_url"):
            value = getattr(self, name)
            if value is not None and "\x00" in value:
                raise InvalidRequest(f"{name} contains a NUL character.")
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if value is not None and len(value) > MAX_PROMPT_CHARS:
                raise InvalidRequest(f"{name} is longer than {MAX_PROMPT_CHARS} characters.")
        _bounded("num_inference_steps", self.num_inference_steps, 1, 150)
        _bounded("guidance_scale", self.guidance_scale, 0.0, 30.0)
        _bounded("controlnet_conditioning_scale", self.controlnet_conditioning_scale, 0.0, 2.0)
        _bounded("strength", self.strength, 0.0, 1.0)
        _bounded("seed", self.seed, 0, 2**32 - 1)
        if self.pose_template_id and self.pose_image is not None:
            raise InvalidRequest("Send at most one of pose_template_id and pose_image.")

    def fingerprint(self) -> str:
        """A digest of everything that defines the request (images by their hash)."""
        fields = asdict(self)
        for name in ("image", "pose_image"):
            raw = fields[name]
            fields[name] = hashlib.sha256(raw).hexdigest() if raw is not None else None
        blob = json.dumps(fields, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


def _bounded(name: str, value: float | None, low: float, high: float) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number.")
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low:g} and {high:g}.")
