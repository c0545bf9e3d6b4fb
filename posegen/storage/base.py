"""The storage interface. Keys are relative, slash-separated paths such as `outputs/<id>/0.png`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


def check_key(key: str) -> str:
    """Refuse keys that could escape the storage root (`..`, absolute paths, odd characters)."""
    if not _KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class Storage(Protocol):
    def put(self, key: str, data: bytes, *, content_type: str = "image/png") -> None: ...

    def get(self, key: str) -> bytes: ...

    def delete(self, key: str) -> None: ...

    def local_path(self, key: str) -> Path | None:
        """A file path to stream from, for local storage; None where a URL is used instead."""
        ...

    def presigned_url(self, key: str) -> str | None:
        """A time-limited download URL, for object stores; None for local storage."""
        ...

    def check(self) -> None:
        """Raise if the storage cannot be reached (readiness)."""
        ...
