"""The broker side that the three doors share: Celery configuration, an after-commit outbox
and the unit of work.

Jobs are enqueued by task *name* with only an id, and only after the database commit: the
domain appends messages to the session's outbox, the boundary sends them once it has
committed (a rollback drops them). The reconciler re-publishes anything lost in between.
Every boundary (an API route, a worker task, a CLI command) commits with `Dispatcher.commit`
and ends with `discard`: `unit_of_work` is both, for a block of work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu.entity import Queue
from sqlalchemy.orm import Session

from posegen.events import EventLog, recorded
from posegen.settings import Settings

if TYPE_CHECKING:
    from db.models import Generation

log = logging.getLogger(__name__)

# The generation queues: one per model, `generation.<model_key>`. A message on one says "a job
# of this model is ready"; the worker that takes it claims the best queued job of the models it
# serves (posegen.scheduler). `generation` names them all where queues are listed
# (`posegen worker --queues generation`).
GENERATION_QUEUE = "generation"
# Hosted jobs (a model whose provider is not `local`, or a job routed to its fallback): one
# queue, served by `posegen worker --queues remote` (no GPU, no torch), whose claim takes the
# best queued job of every hosted model.
REMOTE_QUEUE = "remote"
WEBHOOK_QUEUE = "webhooks"
MAINTENANCE_QUEUE = "maintenance"

GENERATE_TASK = "posegen.generate"
GENERATE_REMOTE_TASK = "posegen.generate_remote"
DELIVER_WEBHOOK_TASK = "posegen.deliver_webhook"
RECONCILE_TASK = "posegen.reconcile"
SWEEP_WEBHOOKS_TASK = "posegen.sweep_webhooks"
PURGE_TASK = "posegen.purge_expired"
SWEEP_STORAGE_TASK = "posegen.sweep_storage"

# Redis priority steps: kombu keeps one list per step and pops them in order, lowest number
# first. Our model priorities are "higher runs first", so the Celery priority is 9 - priority.
PRIORITY_STEPS = list(range(10))
PRIORITY_SEP = ":"
# How long a GPU worker's child may take to start with POSEGEN_COMPILE: its models compiled at
# every batch size it uses before it takes a job (an hour covers a handful of models in
# torch.compile's slowest mode).
COMPILE_START_SECONDS = 3600


def priority_keys(queue: str) -> list[str]:
    """The Redis lists kombu keeps for one queue: the bare name for step 0, then name:step."""
    return [queue, *(f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS if step)]


def model_queue(model_key: str) -> str:
    return f"{GENERATION_QUEUE}.{model_key}"


def broker_url(settings: Settings) -> str:
    return settings.broker_url or "filesystem://"


def _transport_options(settings: Settings) -> dict[str, Any]:
    """The broker transport's options: folders for the embedded one, timeouts for Redis."""
    if settings.embedded_broker:
        folder = settings.broker_dir.resolve()
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            # kombu's default is ./control, in whatever folder the process started in.
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    return {
        "priority_steps": PRIORITY_STEPS,
        "sep": PRIORITY_SEP,
        "queue_order_strategy": "priority",
        # An unacked message (a worker died mid-job) is redelivered after this long. It
        # must stay well above the hard time limit, or a long job would run twice.
        "visibility_timeout": int(settings.job_hard_time_limit * 4),
        # A dead Redis must not hang a request or a worker.
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
        "retry_on_timeout": True,
    }


def configure_celery(app: Celery, settings: Settings) -> None:
    """The one Celery configuration, shared by the producer (API) and the worker."""
    app.conf.update(
        broker_url=broker_url(settings),
        broker_transport_options=_transport_options(settings),
        broker_connection_timeout=5,
        broker_connection_retry_on_startup=True,
        # The database holds job state: no result backend, nothing stored per task.
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=GENERATION_QUEUE,
        task_queues=[
            Queue(GENERATION_QUEUE),
            Queue(REMOTE_QUEUE),
            Queue(WEBHOOK_QUEUE),
            Queue(MAINTENANCE_QUEUE),
        ],
        task_routes={
            GENERATE_TASK: {"queue": GENERATION_QUEUE},
            GENERATE_REMOTE_TASK: {"queue": REMOTE_QUEUE},
            DELIVER_WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE},
            SWEEP_WEBHOOKS_TASK: {"queue": MAINTENANCE_QUEUE},
            RECONCILE_TASK: {"queue": MAINTENANCE_QUEUE},
            PURGE_TASK: {"queue": MAINTENANCE_QUEUE},
            SWEEP_STORAGE_TASK: {"queue": MAINTENANCE_QUEUE},
        },
        # Publishing gives up quickly: the job row is committed already and the reconciler
        # re-publishes it, so a request must not wait on a broker that is down.
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        # Late acks: a message is acknowledged after the task ran, so a worker that dies
        # mid-job leaves it to be redelivered; the claim makes the rerun safe.
        task_acks_late=True,
        # ...and a task whose worker process was killed (OOM, SIGKILL) is requeued too.
        task_reject_on_worker_lost=True,
        # Prefetch 1: a busy GPU worker holds no second job that an idle one could run, and
        # the next job taken is the highest-priority one when the worker frees up.
        worker_prefetch_multiplier=1,
        # Soft limit raises inside the task (it records `timeout`); the hard limit kills.
        task_soft_time_limit=settings.job_soft_time_limit,
        task_time_limit=settings.job_hard_time_limit,
        # A GPU worker's child imports torch and diffusers when it starts (see `posegen worker`),
        # and with POSEGEN_COMPILE compiles its models (worker.engine.warmup: minutes per
        # model): give it time before Celery decides the child is stuck (default 4 s).
        worker_proc_alive_timeout=COMPILE_START_SECONDS if settings.compile else 120,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        enable_utc=True,
    )


def make_producer(settings: Settings) -> Celery:
    app = Celery("posegen", set_as_current=False)
    configure_celery(app, settings)
    return app


@dataclass(frozen=True)
class Message:
    task: str
    args: tuple[Any, ...]
    queue: str
    priority: int | None = None
    soft_time_limit: float | None = None
    time_limit: float | None = None


def time_limits(
    job: Generation, settings: Settings, *, images: int | None = None
) -> tuple[float, float]:
    """(soft, hard) seconds for this job: a generous allowance from its steps and pixels
    (2 s per step at 512x512, some twenty times a slow GPU's pace, plus a minute for a cold
    model load), never above the configured limits. `images`: the images of the pipeline call
    it runs in (a batch's; default its own outputs). Past the soft limit the runner stops the
    job between steps and fails it with `timeout`; Celery's limits (the configured ones) stop
    a job stuck inside a step."""
    count = images if images is not None else job.params.get("num_outputs", 1)
    pixels = count * job.params["width"] * job.params["height"] / (512 * 512)
    soft = min(settings.job_soft_time_limit, 60 + 2.0 * job.params["num_inference_steps"] * pixels)
    hard = min(settings.job_hard_time_limit, soft + 60)
    return soft, max(hard, soft + 1)


def ready_message(model_key: str, settings: Settings, *, job_id: str | None = None) -> Message:
    """ "A job of this model is ready", naming the job it was sent for (for logs and tests).
    Whichever job the worker claims runs under the configured limits (Celery's, set when the
    task starts), and under its own `time_limits` between steps (the runner)."""
    return Message(
        task=GENERATE_TASK,
        args=(job_id, model_key),
        queue=model_queue(model_key),
        soft_time_limit=settings.job_soft_time_limit,
        time_limit=settings.job_hard_time_limit,
    )


def remote_message(settings: Settings, *, job_id: str | None = None) -> Message:
    """ "A hosted job is ready": on the remote queue, whose worker claims the best queued job
    of every hosted model. It waits on the network, not a GPU: the runner bounds each job by
    its own time limit (the remote worker's thread pool enforces none of Celery's)."""
    return Message(
        task=GENERATE_REMOTE_TASK,
        args=(job_id, None),
        queue=REMOTE_QUEUE,
        soft_time_limit=settings.job_soft_time_limit,
        time_limit=settings.job_hard_time_limit,
    )


def is_hosted(job: Generation) -> bool:
    """Whether the job runs on a hosted provider (a new job's provider is unset until its
    insert, which makes it `local`)."""
    return job.provider is not None and job.provider != "local"


def generate_message(job: Generation, settings: Settings) -> Message:
    """The message a queued job is sent with (`ready_message`, or `remote_message` for a job
    that runs on a hosted provider)."""
    if is_hosted(job):
        return remote_message(settings, job_id=job.id)
    return ready_message(job.model_key, settings, job_id=job.id)


def defer(session: Session, message: Message) -> None:
    """Queue a message to be sent after this session's transaction commits."""
    session.info.setdefault("outbox", []).append(message)


def drop_outbox(session: Session) -> None:
    session.info.pop("outbox", None)
    recorded(session)  # the job events of the transaction, dropped with it


def discard(session: Session) -> None:
    """End a boundary's session: whatever it did not commit is rolled back and its deferred
    messages are dropped with it."""
    try:
        session.rollback()
    finally:
        drop_outbox(session)
        session.close()


@contextmanager
def unit_of_work(session: Session, dispatcher: Dispatcher) -> Iterator[Session]:
    """A block of work in one transaction: committed, then its deferred messages published,
    when the block ends; rolled back with its messages dropped when it raises."""
    try:
        yield session
        dispatcher.commit(session)
    finally:
        discard(session)


class Dispatcher:
    """Sends what the domain deferred, once the boundary has committed."""

    def __init__(
        self, celery: Celery | Callable[[], Celery], *, events: EventLog | None = None
    ) -> None:
        # A factory is called on first use: a CLI command that defers nothing never builds a
        # producer (which, on the embedded broker, creates its folders).
        self._celery = celery
        # Where the jobs' live events go once their transaction commits (None: nowhere).
        self.events = events

    @cached_property
    def celery(self) -> Celery:
        return self._celery if isinstance(self._celery, Celery) else self._celery()

    def send(self, message: Message) -> None:
        options: dict[str, Any] = {"queue": message.queue}
        if message.priority is not None:
            options["priority"] = message.priority
        if message.soft_time_limit is not None:
            options["soft_time_limit"] = message.soft_time_limit
        if message.time_limit is not None:
            options["time_limit"] = message.time_limit
        self.celery.send_task(message.task, args=list(message.args), **options)

    def waiting(self, queue: str) -> int | None:
        """Messages waiting on a queue (not yet delivered), or None where the broker cannot
        say (the embedded one). On Redis: the lengths of the queue's priority lists, read in
        one round trip."""
        with self.celery.connection_for_read() as conn:
            if conn.transport.driver_type != "redis":
                return None
            pipe = conn.default_channel.client.pipeline(transaction=False)
            for key in priority_keys(queue):
                pipe.llen(key)
            return sum(int(n) for n in pipe.execute())

    def consumers(self, *, timeout: float = 1.0) -> dict[str, list[str]] | None:
        """Queue name -> the workers consuming it, asked of the workers by Celery's remote
        control (a broadcast; replies within `timeout`); None where the broker cannot
        broadcast (the embedded one)."""
        if self.celery.conf.broker_url.startswith("filesystem"):
            return None
        # A connection of its own, closed after: the replies are read with a blocking pop,
        # which must not stay behind on a pooled connection.
        with self.celery.connection() as conn:
            inspect = self.celery.control.inspect(timeout=timeout, connection=conn)
            replies = inspect.active_queues() or {}
        serving: dict[str, list[str]] = {}
        for worker, queues in replies.items():
            for queue in queues:
                serving.setdefault(queue["name"], []).append(worker)
        return {queue: sorted(workers) for queue, workers in serving.items()}

    def flush(self, session: Session) -> int:
        events = recorded(session)
        if self.events is not None:
            self.events.publish(events)
        messages: list[Message] = session.info.pop("outbox", [])
        sent = 0
        for message in messages:
            try:
                self.send(message)
                sent += 1
            except Exception:
                log.warning(
                    "publish failed; the reconciler will retry",
                    extra={"task": message.task, "task_args": message.args},
                    exc_info=True,
                )
        return sent

    def commit(self, session: Session) -> None:
        """The boundary's commit: write, then publish."""
        session.commit()
        self.flush(session)
