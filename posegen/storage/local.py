"""Local-disk storage: files under one root directory; keys cannot escape it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from posegen.storage.base import check_key


class LocalStorage:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"storage key {key!r} escapes the root")
        return path

    def put(self, key: str, data: bytes, *, content_type: str = "image/png") -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half a file, a crash never leaves one.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        Path(tmp).replace(path)

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # A job's folder goes with its last file: deleted jobs leave no empty folders behind.
        if path.parent != self.root:
            with contextlib.suppress(OSError):  # not empty, or gone already
                path.parent.rmdir()

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def presigned_url(self, key: str) -> str | None:
        return None

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise OSError(f"storage root {self.root} is not writable")
