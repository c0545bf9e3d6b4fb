"""Domain errors. Each carries the contract's code and HTTP status; one handler maps them."""

from __future__ import annotations


class PosegenError(Exception):
    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class Unauthorized(PosegenError):
    code, status = "unauthorized", 401


class InsufficientCredits(PosegenError):
    code, status = "insufficient_credits", 402


class TierRequired(PosegenError):
    code, status = "tier_required", 403


class NotFound(PosegenError):
    code, status = "not_found", 404


class AlreadyFinished(PosegenError):
    code, status = "already_finished", 409


class ModelUnavailable(PosegenError):
    code, status = "model_unavailable", 409


class PayloadTooLarge(PosegenError):
    code, status = "payload_too_large", 413


class UnsupportedImage(PosegenError):
    code, status = "unsupported_image", 415


class InvalidRequest(PosegenError):
    code, status = "invalid_request", 422


class IdempotencyKeyReused(PosegenError):
    code, status = "idempotency_key_reused", 422


class RateLimited(PosegenError):
    code, status = "rate_limited", 429


class QueueFull(PosegenError):
    """The caller has as many queued jobs as their tier allows (POSEGEN_MAX_QUEUED_PER_USER)."""

    code, status = "queue_full", 429

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class Overloaded(PosegenError):
    """The model's queue is at its depth limit (POSEGEN_MAX_QUEUE_DEPTH)."""

    code, status = "overloaded", 503

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class Unavailable(PosegenError):
    code, status = "unavailable", 503


class StorageUnavailable(Unavailable):
    """The object store could not be reached, or answered with a server error, after the
    client's own retries. A submit answers 503 (its transaction rolls back: nothing charged);
    a worker holds the job while it retries, then gives it back to the queue."""

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class JobError(Exception):
    """A job's failure, recorded on the job with a contract code (`no_pose_detected`, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
