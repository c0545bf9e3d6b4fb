"""A Python client of the posegen API (httpx; no torch, nothing of the server's):

    from posegen.client import Client

    with Client("http://127.0.0.1:8000", api_key) as client:
        job = client.submit("me.jpg", model_key="sd15-openpose", pose_template_id="waving")
        job = client.wait(job["id"], timeout=300)
        client.download(job["id"], 0, "avatar.png")

See docs/client.md."""

from posegen.client.aio import AsyncClient
from posegen.client.errors import (
    ApiError,
    PosegenClientError,
    StreamLost,
    WaitTimeout,
    WebhookVerificationError,
)
from posegen.client.protocol import ImageInput, SubmitFields
from posegen.client.sync import Client
from posegen.client.types import TERMINAL, Event, Job, JobPage, Me, Model, PoseTemplate
from posegen.client.webhooks import verify_webhook

__all__ = [
    "TERMINAL",
    "ApiError",
    "AsyncClient",
    "Client",
    "Event",
    "ImageInput",
    "Job",
    "JobPage",
    "Me",
    "Model",
    "PoseTemplate",
    "PosegenClientError",
    "StreamLost",
    "SubmitFields",
    "WaitTimeout",
    "WebhookVerificationError",
    "verify_webhook",
]
