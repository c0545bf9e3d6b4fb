"""A thread that records a finished job while the worker runs the next one (the runner's
`behind`): its own module so that the worker context can hold one without importing the
runner."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)


class Finisher:
    """Records finished jobs on a thread of its own, one behind the worker's current job.

    At most one is pending: a new one first waits for the last (its image in memory, its
    lease still renewed by its heartbeat). The job's message is acknowledged when the task
    returns, before the record is written; a process that dies in between leaves the job
    `processing` with a lease that runs out, and the reconciler queues it again, as it does
    for a process that dies mid-job (that job's redelivered message finds it claimed)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finisher")
        self._pending: Future[str] | None = None

    def submit(self, record: Callable[[], str]) -> None:
        self.wait()
        self._pending = self._pool.submit(self._logged, record)

    def wait(self) -> str | None:
        """Wait for the pending record, if any; its outcome ("completed", "canceled", or
        "failed" where recording raised)."""
        pending, self._pending = self._pending, None
        return None if pending is None else pending.result()

    @staticmethod
    def _logged(record: Callable[[], str]) -> str:
        try:
            return record()
        except Exception:
            log.exception("recording a finished job failed; it runs again once its lease ends")
            return "failed"
