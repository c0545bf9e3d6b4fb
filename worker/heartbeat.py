"""A running job's heartbeat: lease renewal, progress and cancel, on a thread and database
session of its own (one per job, also for each job of a batch)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sqlalchemy.orm import Session

from db.models import Generation
from posegen import announce, events, lifecycle
from worker.context import WorkerContext

log = logging.getLogger(__name__)


@dataclass
class Heartbeat:
    """Lease renewal, progress and cancel, on its own thread and database session."""

    ctx: WorkerContext
    job_id: str
    job: Generation | None = None  # as claimed: what its progress events show
    preview_url: str | None = None  # set once a preview is stored

    def __post_init__(self) -> None:
        self._stop_at = float("inf")
        self._deadline = False
        self._step: tuple[int, int] | None = None
        self._written: tuple[int, int] | None = None
        self._hooked_at = -float("inf")  # when a progress webhook was last recorded
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"heartbeat-{self.job_id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def progress(self, step: int, total: int) -> None:
        """The engine's step, for the next beat and the event stream; none once the job has
        stopped (canceled or out of time: a batch runs on for its other jobs)."""
        if self.canceled():
            return
        self._step = (step, total)
        sink = self.ctx.dispatcher.events
        if sink is not None and self.job is not None:
            extra = {"preview_url": self.preview_url} if self.preview_url and step else {}
            sink.publish([events.progress(self.job, step=step, total=total, **extra)])

    def stop_at(self, when: float, *, deadline: bool) -> None:
        """Stop the job between steps at this time (time.time()): its time limit, or its
        deadline (`deadline`)."""
        self._stop_at, self._deadline = when, deadline

    @property
    def stops_at(self) -> float:
        """When (time.time()) the job stops between steps: its time limit or deadline."""
        return self._stop_at

    def canceled(self) -> bool:
        """Whether the engine is to stop before its next step: the job is no longer ours
        (canceled), or out of time."""
        return self._lost.is_set() or time.time() >= self._stop_at

    def out_of_time(self) -> str | None:
        """Why a job that stopped between steps did: `deadline_exceeded` or `timeout` when it
        ran out of time (and was not canceled meanwhile), None when canceled."""
        if self._lost.is_set() or time.time() < self._stop_at:
            return None
        return "deadline_exceeded" if self._deadline else "timeout"

    def _progress_webhook(self, session: Session, step: tuple[int, int]) -> None:
        """At most one per POSEGEN_WEBHOOK_PROGRESS_INTERVAL, with the progress written."""
        now = time.monotonic()
        if self.job is None or now - self._hooked_at < self.ctx.settings.webhook_progress_interval:
            return
        self._hooked_at = now
        announce.progress_webhook(session, self.job, step=step[0], total=step[1])

    def _loop(self) -> None:
        interval = self.ctx.settings.heartbeat_seconds
        while not self._stop.wait(interval):
            self.beat()
        # The job's runner stopped it: what a test of the runner's every path looks for.
        log.debug("heartbeat stopped", extra={"job_id": self.job_id})

    def beat(self) -> None:
        step = self._step
        try:
            with self.ctx.session() as session:
                ours = lifecycle.heartbeat(
                    session,
                    job_id=self.job_id,
                    worker_id=self.ctx.worker_id,
                    lease_seconds=self.ctx.settings.job_lease_seconds,
                    step=step[0] if step and step != self._written else None,
                    total=step[1] if step and step != self._written else None,
                )
                if ours and step and step[0] and step != self._written:
                    self._progress_webhook(session, step)
        except Exception:
            log.warning("heartbeat failed", extra={"job_id": self.job_id}, exc_info=True)
            return
        self._written = step
        if not ours:
            self._lost.set()
