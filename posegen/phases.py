"""What a running job waits for besides its steps (`progress.phase`): `provider_loading`
while its hosted model loads at the provider, until about `phase_until` (the job's
`eta_seconds`). Not a change of status (posegen.lifecycle holds those): a write to a job that
is still this worker's, renewing its lease as a heartbeat does."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import bindparam, update
from sqlalchemy.orm import Session

from db.models import Generation
from db.types import utcnow

# The job is still running on this worker (not canceled, not taken over): bind job_id, worker.
_OURS = (
    Generation.id == bindparam("job_id"),
    Generation.status == "processing",
    Generation.worker_id == bindparam("worker"),
)


def provider_phase(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    phase: str | None,
    until: dt.datetime | None = None,
    lease_seconds: float,
) -> bool:
    """A running job waits on its provider (`phase`, until about `until`: the job's ETA) or
    no longer (None); the lease renewed. False: the job is no longer ours (canceled)."""
    values = {
        "progress_phase": phase,
        "phase_until": until if phase else None,
        "lease_expires_at": utcnow() + dt.timedelta(seconds=lease_seconds),
    }
    result = session.execute(
        update(Generation).where(*_OURS).values(**values),
        {"job_id": job_id, "worker": worker_id},
        execution_options={"synchronize_session": False},
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]
