"""Generation jobs as the API sees them: what a caller asks for (`request`), what changes a
job on their behalf (`service`: submit, cancel), and what reads jobs (`queries`: one, a page,
the queue position and ETA, the job's JSON). The job's JSON itself is `posegen.render`."""

from posegen.jobs.queries import (
    QUEUE_ORDER,
    Page,
    get_for_user,
    job_json,
    list_for_user,
    output_key,
    recent_run_seconds,
)
from posegen.jobs.request import MAX_DEADLINE_SECONDS, GenerationRequest
from posegen.jobs.service import Submitted, cancel, submit
from posegen.render import POSITION_CAP

__all__ = [
    "MAX_DEADLINE_SECONDS",
    "POSITION_CAP",
    "QUEUE_ORDER",
    "GenerationRequest",
    "Page",
    "Submitted",
    "cancel",
    "get_for_user",
    "job_json",
    "list_for_user",
    "output_key",
    "recent_run_seconds",
    "submit",
]
