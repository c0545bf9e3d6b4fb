"""The images a running job shows besides its outputs, stored off the job's thread so the
model never waits on storage for them: the skeleton it is conditioned on (`GET .../pose`),
and its latest step preview (`GET .../preview`, one key per job, overwritten). A preview that
comes while the last is still being written is dropped, so a slow store costs previews, not
steps. Best effort: a write that fails is logged, and the job goes on."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from PIL import Image

from posegen.errors import PosegenError
from posegen.images import as_png
from posegen.storage import Storage
from posegen.storage.keys import pose_key, preview_key

log = logging.getLogger(__name__)


class JobImages:
    def __init__(
        self, storage: Storage, job_id: str, *, on_preview: Callable[[], None] | None = None
    ) -> None:
        """`on_preview` is called once a preview is stored."""
        self.storage, self.job_id, self.on_preview = storage, job_id, on_preview
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-images")
        self._preview: Future[None] | None = None

    def pose(self, skeleton: Image.Image) -> None:
        self._pool.submit(self._store, pose_key(self.job_id), skeleton, None)

    def preview(self, step: int, image: Image.Image) -> None:
        if self._preview is not None and not self._preview.done():
            return
        self._preview = self._pool.submit(
            self._store, preview_key(self.job_id), image, self.on_preview
        )

    def close(self) -> None:
        """Wait for the writes under way: none is written after the job's end."""
        self._pool.shutdown(wait=True)

    def _store(self, key: str, image: Image.Image, done: Callable[[], None] | None) -> None:
        try:
            self.storage.put(key, as_png(image))
        except (OSError, PosegenError) as error:
            log.warning("%s was not stored: %s", key, error, extra={"job_id": self.job_id})
            return
        if done is not None:
            done()
