"""S3 storage on boto3 (any S3-compatible store through an endpoint override)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config

from posegen.storage.base import check_key


class S3Storage:
    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        presign_expiry: int = 3600,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.presign_expiry = presign_expiry
        # Credentials come from the standard AWS chain (env, profile, instance role).
        # Short timeouts and few retries: a dead store must not hang a request.
        config = Config(
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"},
            signature_version="s3v4",
        )
        self.client: Any = boto3.client("s3", endpoint_url=endpoint_url, config=config)

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None, presign_expiry: int) -> S3Storage:
        parsed = urlparse(url)
        if not parsed.netloc:
            raise ValueError(f"s3 storage URL {url!r} has no bucket")
        return cls(
            bucket=parsed.netloc,
            prefix=parsed.path,
            endpoint_url=endpoint_url,
            presign_expiry=presign_expiry,
        )

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, *, content_type: str = "image/png") -> None:
        self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type
        )

    def get(self, key: str) -> bytes:
        response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        body: bytes = response["Body"].read()
        return body

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def local_path(self, key: str) -> Path | None:
        return None

    def presigned_url(self, key: str) -> str | None:
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=self.presign_expiry,
        )
        return url

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)
