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

# Asking the workers is a broadcast that waits for their replies (about a second): an answer
# is served this many seconds, then served still while a thread asks again.
CONSUMERS_TTL = 10.0


class Fleet:
    def __init__(
        self,
        dispatcher: Dispatcher,
        sessions: sessionmaker[Session],
        *,
        ttl: float = CONSUMERS_TTL,
    ) -> None:
        self.dispatcher = dispatcher
        self.sessions = sessions
        self.ttl = ttl
        # Guards the fields below; never held while the workers are asked.
        self._lock = threading.Lock()
        self._consumers: tuple[float, dict[str, list[str]] | None] | None = None
        self._asking: threading.Thread | None = None
        self._failed_at = -ttl

    def consumers(self, *, wait: bool = True) -> dict[str, list[str]] | None:
        """Queue -> workers, as the workers last said (None: the broker cannot tell). An
        answer past its `ttl` is served while a thread asks again, so no caller waits on
        the broadcast; only with no answer yet does a caller wait for the first (`wait`), or
        get None. Raises when the first could not be had (the broker failed)."""
        with self._lock:
            cached, asking = self._consumers, self._ask_if_stale()
        if cached is not None:
            return cached[1]
        if not wait:
            return None
        if asking is not None:
            asking.join()
        with self._lock:
            cached = self._consumers
        if cached is None:
            raise RuntimeError("the workers could not be asked which queues they serve")
        return cached[1]

    def _ask_if_stale(self) -> threading.Thread | None:
        """The thread asking the workers (started now if the answer is stale and none is), or
        None: the answer is fresh, or the broker failed less than `ttl` ago (a broker
        outage is not asked again at every call). Called with the lock held."""
        now = time.monotonic()
        if self._asking is not None and self._asking.is_alive():
            return self._asking
        if self._consumers is not None and now - self._consumers[0] < self.ttl:
            return None
        if now - self._failed_at < self.ttl:
            return None
        self._asking = threading.Thread(target=self._ask, name="fleet-consumers", daemon=True)
        self._asking.start()
        return self._asking

    def _ask(self) -> None:
        try:
            consumers = self.dispatcher.consumers()
        except Exception:  # any broker failure means "cannot tell", until asked again
            log.warning("could not ask the workers which queues they serve", exc_info=True)
            with self._lock:
                self._failed_at = time.monotonic()
            return
        with self._lock:
            self._consumers = (time.monotonic(), consumers)

    def unserved(self, model_key: str) -> bool:
        """Whether no worker serves this local model's queue now, as far as the workers last
        said (no answer yet, a broker that cannot tell or cannot be reached: False). Asked by
        a submit whose model has a fallback, inside its transaction: it never waits on the
        broadcast (`consumers`), nor fails on a broker outage."""
        consumers = self.consumers(wait=False)
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
