"""A batch's claim: the next job, then the queued jobs one pipeline call can run with it, in
the scheduler's order (POSEGEN_MAX_BATCH). Each is claimed as a job of its own through
posegen.lifecycle, which keeps every change of a job's status."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from posegen import lifecycle, scheduler
from posegen.settings import Settings


def claim_batch(
    session: Session,
    *,
    worker_id: str,
    models: Sequence[str],
    warm: Sequence[str] = (),
    lease_seconds: float,
    settings: Settings,
    max_images: int,
) -> list[lifecycle.Claim]:
    """The next job (`claim_next`), then queued jobs that can run in the same pipeline call,
    each claimed for this worker in the scheduler's order until the batch holds `max_images`
    images (POSEGEN_MAX_BATCH): same model, the same `Params.batch_key`, and room for their
    outputs (`scheduler.next_member`), none tried before. A head tried before runs alone:
    whatever ended its last attempt (a crash of the worker process) takes no batch-mates
    with it. Each stays a job of its own: its claim, its turn moved to the back, its
    `started` event. Empty: nothing to run."""
    head = lifecycle.claim_next(
        session, worker_id=worker_id, models=models, warm=warm, lease_seconds=lease_seconds,
        settings=settings,
    )  # fmt: skip
    if head is None:
        return []
    claims = [head]
    if head.attempt > 1:  # its claim counted this attempt
        return claims
    room = max_images - scheduler.images(head.job.params)
    key = scheduler.batch_key(head.job.params, head.job.negative_prompt)
    skip: list[scheduler.Turn] = []
    while room > 0 and key is not None:
        found = scheduler.next_member(
            session, model_id=head.job.model_id, key=key, room=room, skip=skip
        )
        if found is None:
            break
        job_id, turn, count = found
        claimed = lifecycle.claim(
            session, job_id=job_id, worker_id=worker_id, lease_seconds=lease_seconds
        )
        if claimed is None:  # no longer queued: that turn is passed over
            skip.append(turn)
            continue
        claims.append(claimed)
        room -= count
    return claims
