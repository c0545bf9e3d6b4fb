"""What the operator sees of the fleet: per model, the jobs queued and the workers that serve
it (`/ready`'s detail, `/metrics`). A model whose jobs wait with no worker serving it shows up
here, so a fleet can scale on it (up from zero, too)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import LOCAL, AiModel, Generation, status_is
from posegen.queue import (
    MAINTENANCE_QUEUE,
    REMOTE_QUEUE,
    WEBHOOK_QUEUE,
    Dispatcher,
    model_queue,
)

log = logging.getLogger(__name__)

# Asking the workers is a broadcast that waits for their replies: once per this many seconds.
CONSUMERS_TTL = 10.0


class Fleet:
    def __init__(self, dispatcher: Dispatcher, sessions: sessionmaker[Session]) -> None:
        self.dispatcher = dispatcher
        self.sessions = sessions
        self._lock = threading.Lock()
        self._consumers: tuple[float, dict[str, list[str]] | None] | None = None
        self._unreachable_at = -CONSUMERS_TTL

    def consumers(self) -> dict[str, list[str]] | None:
        """Queue -> workers, as the workers last said (None: the broker cannot tell)."""
        with self._lock:
            cached = self._consumers
            if cached is None or time.monotonic() - cached[0] >= CONSUMERS_TTL:
                cached = (time.monotonic(), self.dispatcher.consumers())
                self._consumers = cached
        return cached[1]

    def unserved(self, model_key: str) -> bool:
        """Whether no worker serves this local model's queue now, as far as the workers say
        (a broker that cannot tell, or cannot be reached: False). Asked of a submit whose
        model has a fallback: a broker outage must not fail the submit, nor slow each one
        (an unreachable broker is not asked again for CONSUMERS_TTL)."""
        if time.monotonic() - self._unreachable_at < CONSUMERS_TTL:
            return False
        try:
            consumers = self.consumers()
        except Exception:  # any broker failure means "cannot tell"
            log.warning("could not ask the workers which queues they serve", exc_info=True)
            self._unreachable_at = time.monotonic()
            return False
        return consumers is not None and not consumers.get(model_queue(model_key))

    def _models_and_queued(self) -> tuple[dict[str, str], dict[str, int]]:
        """Enabled models (key -> the broker queue that serves it) and queued jobs per
        model."""
        with self.sessions() as session:
            rows = session.execute(
                select(AiModel.model_key, AiModel.provider).where(AiModel.enabled)
            ).all()
            queued = session.execute(
                select(Generation.model_key, func.count())
                .where(status_is(Generation.status, "queued"))
                .group_by(Generation.model_key)
            ).all()
        models = {
            key: model_queue(key) if provider == LOCAL else REMOTE_QUEUE for key, provider in rows
        }
        return models, {key: int(n) for key, n in queued}

    def models(self) -> dict[str, dict[str, Any]]:
        """Per model (enabled, or with jobs queued): `queued` jobs and the `workers` serving
        it (null where the broker cannot tell)."""
        models, queued = self._models_and_queued()
        consumers = self.consumers()
        return {
            key: {
                "queued": queued.get(key, 0),
                "workers": (
                    None
                    if consumers is None
                    else consumers.get(models.get(key, model_queue(key)), [])
                ),
            }
            for key in sorted(set(models) | set(queued))
        }

    def workers_per_model(self) -> dict[str, int] | None:
        consumers = self.consumers()
        if consumers is None:
            return None
        models, _ = self._models_and_queued()
        return {key: len(consumers.get(queue, [])) for key, queue in models.items()}

    def depths(self) -> dict[str, int]:
        """Messages waiting per queue (empty where the broker cannot say): each model's
        generation queue, `generation` their sum, and the housekeeping queues."""
        models, _ = self._models_and_queued()
        depths: dict[str, int] = {}
        queues = dict.fromkeys([*models.values(), WEBHOOK_QUEUE, MAINTENANCE_QUEUE])
        for queue in queues:
            waiting = self.dispatcher.waiting(queue)
            if waiting is not None:
                depths[queue] = waiting
        if depths:
            depths["generation"] = sum(
                n for queue, n in depths.items() if queue.startswith("generation.")
            )
        return depths
