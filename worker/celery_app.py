"""The worker's Celery app: the shared configuration, the tasks and beat's schedule.

`celery -A worker.celery_app worker` works as well as `posegen worker`.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery, signals

from posegen.logs import configure_logging
from posegen.queue import (
    PURGE_TASK,
    RECONCILE_TASK,
    SWEEP_STORAGE_TASK,
    SWEEP_WEBHOOKS_TASK,
    configure_celery,
)
from posegen.settings import Settings, get_settings
from worker.context import finish_pending
from worker.tasks import register


def create_celery(settings: Settings) -> Celery:
    app = Celery("posegen")
    configure_celery(app, settings)
    app.conf.beat_schedule = {
        "reconcile": {"task": RECONCILE_TASK, "schedule": settings.reconcile_interval},
        "sweep-webhooks": {
            "task": SWEEP_WEBHOOKS_TASK,
            "schedule": settings.webhook_sweep_interval,
        },
        "purge-expired": {"task": PURGE_TASK, "schedule": 3600.0},
        # Files of finished jobs the worker or the API could not remove at once, and outputs
        # past their retention: as often as the reconciler, so a missed purge is short-lived.
        "sweep-storage": {"task": SWEEP_STORAGE_TASK, "schedule": settings.reconcile_interval},
    }
    register(app)
    return app


@signals.setup_logging.connect
def _json_logs(**_: Any) -> None:
    # Our structured logs (job ids in every line) instead of Celery's own format. The signal
    # does not say which Celery program runs; `posegen beat` and `celery ... beat` both have
    # "beat" among their arguments.
    configure_logging(get_settings(), process="beat" if "beat" in sys.argv else "worker")


@signals.worker_process_shutdown.connect  # a pool process leaving (prefork)
@signals.worker_shutdown.connect  # the worker leaving (the solo and thread pools)
def _finish_pending(**_: Any) -> None:
    # A job finished just before is recorded before the process goes.
    finish_pending()


# Celery's CLI and worker processes look the app up by module attribute. Building it
# connects to nothing.
app = create_celery(get_settings())
