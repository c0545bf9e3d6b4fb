"""What is on the broker, read straight from Redis: the job id each generation message
carries, so a test can say exactly which jobs were published, and how often."""

from __future__ import annotations

import base64
import json
from typing import Any

import redis

from posegen.queue import GENERATE_TASK, GENERATION_QUEUE

# Where kombu keeps the messages a worker took and has not acknowledged yet (late acks: until
# the task returns), keyed by delivery tag.
UNACKED = "unacked"


def job_id_of(raw: bytes | dict[str, Any]) -> str | None:
    """The job id in one kombu message as Redis holds it (JSON, with a base64 task body of
    `[args, kwargs, embed]`); None for a message of another task."""
    message = json.loads(raw) if isinstance(raw, bytes) else raw
    if message["headers"].get("task") != GENERATE_TASK:
        return None
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    job_id: str = args[0]
    return job_id


def generation_lists(client: redis.Redis) -> list[bytes]:
    """The Redis lists of every model's generation queue (`generation.<model_key>`)."""
    keys = client.scan_iter(match=f"{GENERATION_QUEUE}.*")
    return [key for key in keys if client.type(key) == b"list"]


def waiting_job_ids(url: str) -> list[str]:
    """The job ids of every generation message waiting, over every model's queue, sorted (a
    job published twice is there twice)."""
    client = redis.Redis.from_url(url)
    ids = (job_id_of(raw) for key in generation_lists(client) for raw in client.lrange(key, 0, -1))  # fmt: skip
    return sorted(i for i in ids if i is not None)


def unacked_job_ids(url: str) -> list[str]:
    """The job ids of the generation messages a worker holds, sorted."""
    client = redis.Redis.from_url(url)
    ids = (job_id_of(json.loads(raw)[0]) for raw in client.hvals(UNACKED))
    return sorted(i for i in ids if i is not None)
