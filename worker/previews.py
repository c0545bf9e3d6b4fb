"""A running job's step previews, stored off the job's thread: the model does not wait for
a PNG or an upload. The latest one is kept (one key per job, overwritten); a preview that
comes while the last is still being written is dropped, so a slow store costs previews, not
steps."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from PIL import Image

from posegen.errors import PosegenError
from posegen.images import as_png
from posegen.storage import Storage
from posegen.storage.keys import preview_key

log = logging.getLogger(__name__)


class Previews:
    def __init__(self, storage: Storage, job_id: str, *, on_stored: Callable[[], None]) -> None:
        self.storage, self.job_id, self.on_stored = storage, job_id, on_stored
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preview")
        self._pending: Future[None] | None = None

    def add(self, step: int, image: Image.Image) -> None:
        if self._pending is not None and not self._pending.done():
            return
        self._pending = self._pool.submit(self._store, image)

    def close(self) -> None:
        """Wait for the preview being written: none is written after the job's end."""
        self._pool.shutdown(wait=True)

    def _store(self, image: Image.Image) -> None:
        try:
            self.storage.put(preview_key(self.job_id), as_png(image))
        except (OSError, PosegenError) as error:
            log.warning("a preview was not stored: %s", error, extra={"job_id": self.job_id})
            return
        self.on_stored()
