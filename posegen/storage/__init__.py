"""Where inputs and outputs live: local disk or S3, behind one small interface."""

from __future__ import annotations

from posegen.settings import Settings
from posegen.storage.base import Storage


def storage_from_settings(settings: Settings) -> Storage:
    url = settings.storage_url
    if url.startswith("s3://"):
        from posegen.storage.s3 import S3Storage

        return S3Storage.from_url(
            url, endpoint_url=settings.s3_endpoint_url, presign_expiry=settings.s3_presign_expiry
        )
    if url.startswith("file://"):
        from posegen.storage.local import LocalStorage

        return LocalStorage(url.removeprefix("file://"))
    raise ValueError(
        f"unsupported POSEGEN_STORAGE_URL {url!r}: use file://PATH or s3://BUCKET/PREFIX"
    )


__all__ = ["Storage", "storage_from_settings"]
