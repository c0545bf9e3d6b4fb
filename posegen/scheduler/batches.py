"""Batches: which queued jobs can join the one a worker claimed, to run in one pipeline call
(POSEGEN_MAX_BATCH images). A job joins when it is of the same model, shares what one call
takes once for all its images (`posegen.params.Params.batch_key`) and fits the images left;
candidates come in the scheduler's order, each the head of its turn, and a turn whose head
does not fit is passed over whole, so a user's jobs still start in the order they came. A job
tried before (attempts > 0) joins none: it runs alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from db.models import Generation
from posegen.params import Params
from posegen.scheduler.pick import Turn, head_of, next_turn

_PARAMS = select(Generation.params, Generation.negative_prompt, Generation.attempts).where(
    Generation.id == bindparam("job_id")
)


def batch_key(params: Mapping[str, Any], negative_prompt: str | None) -> tuple[Any, ...] | None:
    """A stored job's `Params.batch_key`; None for parameters no run takes (it joins none)."""
    try:
        return Params.model_validate(params).batch_key(negative_prompt)
    except ValidationError:
        return None


def images(params: Mapping[str, Any]) -> int:
    """The images a job makes (its outputs): its share of a batch."""
    return int(params.get("num_outputs", 1))


def next_member(
    session: Session, *, model_id: str, key: tuple[Any, ...], room: int, skip: list[Turn]
) -> tuple[str, Turn, int] | None:
    """The next queued job of this model in the scheduler's order that can join a batch of
    `key` with `room` images left, never tried before: (its id, its turn, its images), the
    job and the turn locked until the caller's transaction ends. A turn whose head cannot
    join is added to `skip` (so are turns with no head free to take). None: no more."""
    while (turn := next_turn(session, models=[model_id], skip=skip)) is not None:
        job_id = head_of(session, turn)
        if job_id is not None:
            params, negative_prompt, attempts = session.execute(_PARAMS, {"job_id": job_id}).one()
            count = images(params)
            # A job tried before may be what ended its last attempt (a crash of the worker
            # process): it runs alone, never costing others their attempts.
            if not attempts and count <= room and batch_key(params, negative_prompt) == key:
                return job_id, turn, count
        skip.append(turn)
    return None
