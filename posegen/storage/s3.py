"""S3 storage on boto3 (any S3-compatible store through an endpoint override)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as EndpointUnreachable

from posegen.errors import StorageUnavailable
from posegen.storage.base import check_key


@contextmanager
def reachable(action: str, key: str) -> Iterator[None]:
    """Turn "the store is not there" into StorageUnavailable, once botocore's own retries
    (standard mode: connection errors, timeouts, 5xx and throttling) are spent. Anything
    else (a missing key, denied access) is a real error and stays one."""
    try:
        yield
    except (EndpointUnreachable, HTTPClientError, IncompleteReadError) as exc:
        raise StorageUnavailable(f"Storage is unreachable ({action} {key}).") from exc
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status < 500:
            raise
        raise StorageUnavailable(f"Storage answered {status} ({action} {key}).") from exc


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
        # Short timeouts and few retries: a dead store must not hang a request (it answers
        # 503). A worker retries for longer on top of these (POSEGEN_STORAGE_RETRY_SECONDS).
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
        with reachable("put", key):
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type
            )

    def get(self, key: str) -> bytes:
        with reachable("get", key):  # the body too: a connection cut mid-read
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            body: bytes = response["Body"].read()
        return body

    def delete(self, key: str) -> None:
        with reachable("delete", key):
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
        with reachable("head", self.bucket):
            self.client.head_bucket(Bucket=self.bucket)
