"""What a worker process holds: settings, database, storage, dispatcher and (lazily) the engine.

Built on first use inside the process that runs tasks, never at import, so a Celery parent
forks children that have touched neither CUDA nor a database connection.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import AiModel
from db.session import make_engine, make_session_factory
from posegen.catalog import served_models
from posegen.errors import JobError
from posegen.events import event_log
from posegen.metrics import job_metrics
from posegen.queue import Dispatcher, make_producer, unit_of_work
from posegen.settings import CUDA_MAX_BATCH, Settings, get_settings
from posegen.storage import Storage, storage_from_settings
from posegen.webhook_sender import Sender
from posegen.webhooks import Attempt
from worker.finisher import Finisher

if TYPE_CHECKING:
    from worker.engine.engine import Engine
    from worker.engine.warmup import WarmModel

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    dispatcher: Dispatcher
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    restart_requested: bool = False
    # The pipeline cache entries each model ran with (model key -> keys), for `warm_models`.
    _held: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @cached_property
    def engine(self) -> Engine:
        from billiard.process import current_process

        from worker.engine.engine import Engine, EngineConfig

        s = self.settings
        return Engine(
            EngineConfig(
                model_dir=s.model_dir,
                device=s.device,
                dtype=s.dtype,
                pose_backend=s.pose_backend,
                cache_bytes=s.model_cache_bytes,
                compile=s.compile,
                compile_mode=s.compile_mode,
                cpu_offload=s.cpu_offload,
                torch_threads=s.torch_threads,
                # billiard numbers the pool's processes 0..concurrency-1 (0 outside a pool).
                process_index=getattr(current_process(), "index", 0) or 0,
            )
        )

    @cached_property
    def webhook_sender(self) -> Sender:
        """Sends the webhooks this process is handed (made on first use, in its process)."""
        metrics = job_metrics()

        def count(attempt: Attempt) -> None:
            failed = "http_error" if attempt.status_code else "error"
            outcome = "success" if attempt.ok else failed
            metrics.webhook_attempts.labels(outcome).inc()

        return Sender(unit_of_work=self.session, settings=self.settings, on_attempt=count)

    @cached_property
    def finisher(self) -> Finisher:
        """Records finished jobs one behind the current one (a thread, made on first use in
        the process that runs tasks)."""
        return Finisher()

    @cached_property
    def behind(self) -> Finisher | None:
        """The finisher the Celery task records finished jobs with (POSEGEN_RECORD_BEHIND), or
        None: each job is recorded before its task returns."""
        mode = self.settings.record_behind
        if mode == "off" or (mode == "auto" and not self.engine.leaves_cpu_time):
            return None
        return self.finisher

    @property
    def max_batch(self) -> int:
        """Images one pipeline call runs across jobs (POSEGEN_MAX_BATCH; "auto": 1 on the
        CPU, `CUDA_MAX_BATCH` on CUDA)."""
        setting = self.settings.max_batch
        if setting != "auto":
            return setting
        return CUDA_MAX_BATCH if self.engine.device.startswith("cuda") else 1

    def held(self, model_key: str, cache_keys: tuple[str, ...]) -> None:
        """A job of this model ran on these pipeline cache entries."""
        self._held[model_key] = cache_keys

    def warm_models(self) -> list[str]:
        """The models whose pipelines this process holds loaded now: the scheduler prefers
        their jobs (POSEGEN_AFFINITY_MAX_WAIT)."""
        if "engine" not in vars(self):
            return []
        loaded = set(self.engine.cache.keys())
        return [key for key, entries in self._held.items() if loaded.issuperset(entries)]

    def warm(self) -> None:
        """Import the inference stack and build the engine now (a worker child's start)."""
        import gc

        import diffusers  # noqa: F401 - the import is the point: seconds, paid once

        _ = self.engine
        compiled = self.compile_warm_up() if self.engine.config.compile else []
        log.info(
            "worker process ready",
            extra={
                "device": self.engine.device,
                "record_behind": self.behind is not None,
                "compiled": compiled,
            },
        )
        # Torch, diffusers and the engine are some 600,000 objects that live as long as the
        # process: frozen, a full collection no longer scans them in the middle of a job.
        gc.collect()
        gc.freeze()

    def compile_warm_up(self) -> list[str]:
        """With POSEGEN_COMPILE: the enabled models this process serves, each compiled at its
        size for every batch size up to `max_batch` (`worker.engine.warmup`), before the
        process takes its first job. Their keys; a model whose weights cannot be loaded is
        left out with a warning (its jobs fail as they would have)."""
        from worker.engine.warmup import warm_up

        warmed = []
        for model in self._warm_models():
            try:
                warm_up(self.engine, [model], max_images=self.max_batch)
            except (JobError, OSError) as exc:
                extra = {"model_key": model.model_key, "error": str(exc)}
                log.warning("model not compiled", extra=extra)
                continue
            warmed.append(model.model_key)
        return warmed

    def _warm_models(self) -> list[WarmModel]:
        with self.session() as session:
            served = served_models(session, self.settings.worker_models)
            rows = session.scalars(
                select(AiModel)
                .where(AiModel.id.in_(list(served.values())), AiModel.enabled.is_(True))
                .order_by(AiModel.model_key)
            ).all()
            return [_warm_model(row) for row in rows]

    def session(self) -> AbstractContextManager[Session]:
        """A unit of work: commit then publish what the domain deferred; roll back on error."""
        return unit_of_work(self.sessions(), self.dispatcher)


def _warm_model(row: AiModel) -> WarmModel:
    """What the compile's warm-up runs of a catalog model."""
    from worker.engine.warmup import WarmModel

    return WarmModel(
        model_key=row.model_key, family=row.family, base_model=row.base_model,
        controlnet_model=row.controlnet_model, width=row.width, height=row.height,
        guidance_scale=row.guidance_scale, prompt=row.default_prompt,
        negative_prompt=row.negative_prompt,
    )  # fmt: skip


_context: WorkerContext | None = None
_context_pid: int | None = None


def context() -> WorkerContext:
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid():
        settings = get_settings()
        # The job's thread, its heartbeat, and the job before it: its heartbeat and record.
        engine = make_engine(settings.database_url, pool_size=4)
        _context = WorkerContext(
            settings=settings,
            sessions=make_session_factory(engine),
            storage=storage_from_settings(settings),
            dispatcher=Dispatcher(make_producer(settings), events=event_log(settings)),
        )
        _context_pid = os.getpid()
    return _context


def finish_pending() -> None:
    """Wait for the record of a finished job still pending in this process, if any: a worker
    process that is leaving writes it first."""
    if _context is not None and _context_pid == os.getpid() and "finisher" in vars(_context):
        _context.finisher.wait()
