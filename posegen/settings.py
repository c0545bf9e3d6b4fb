"""The one settings class. Every `POSEGEN_*` variable is read here, once, and injected."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Tier = Literal["free", "basic", "pro", "enterprise"]


DEFAULT_RATE_LIMITS = {"free": 30, "basic": 120, "pro": 600, "enterprise": 3000}
# POSEGEN_MAX_BATCH=auto on CUDA. Not measured yet (docs/performance.md, #24): 4 images of
# SD1.5 at 512 px is where the H100's step time was still far from its compute floor at
# batch 1, and 4 SDXL images at 1024 px fit a 40 GB card's activations with room left.
CUDA_MAX_BATCH = 4
DEFAULT_QUEUED_LIMITS = {"free": 10, "basic": 50, "pro": 200, "enterprise": 1000}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POSEGEN_", extra="ignore")

    # -- where things live ------------------------------------------------------------------
    database_url: str = "sqlite:///./var/posegen.db"
    # Empty means the embedded broker: kombu's filesystem transport under `var_dir/broker`.
    broker_url: str = ""
    storage_url: str = "file://./var/storage"
    s3_endpoint_url: str | None = None
    s3_presign_expiry: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    model_dir: Path = Path("./var/models")
    var_dir: Path = Path("./var")

    # -- inference ----------------------------------------------------------------------------
    device: str = "auto"
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    pose_backend: Literal["auto", "openpose", "mediapipe"] = "auto"
    model_cache_bytes: int = Field(default=24 * 1024**3, ge=0)
    compile: bool = False
    # torch.compile's mode: "default" compiles in a minute or two per model and shape;
    # "max-autotune-no-cudagraphs" also times kernel variants (several minutes);
    # "reduce-overhead" (and "max-autotune") also capture CUDA graphs, which replay a step
    # without launching its kernels one by one (worker.engine.device: how a replay is kept
    # from overwriting the ControlNet's residuals still in use).
    compile_mode: Literal[
        "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"
    ] = "default"
    cpu_offload: bool = False
    # Images a worker runs in one pipeline call, across queued jobs that one call can take
    # (posegen.scheduler.batches). "auto": 1 on the CPU, where a batch only shares the cores
    # out; on CUDA `CUDA_MAX_BATCH` (docs/performance.md: how it was chosen).
    max_batch: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    # Threads for torch's CPU operators per worker process; 0 is torch's default (one per
    # core). On a machine that also runs the API and the database, leave them a core: two
    # threads on two busy cores wait for each other at every operator.
    torch_threads: int = Field(default=0, ge=0, le=512)
    # Record a finished job (PNG, upload, completion) on a thread of its own while the next job
    # runs. "auto": where the model leaves the CPU time for it (on a GPU, or on CPU threads that
    # leave a core free); on a CPU whose every core runs the model it would only take from it.
    record_behind: Literal["auto", "on", "off"] = "auto"
    # A job with `preview=true` stores a preview at its first step, then at most this often.
    preview_interval: float = Field(default=1.0, ge=0)

    # -- API limits ---------------------------------------------------------------------------
    # Requests one API process works on at once (its thread pool), and the database
    # connections it keeps for them. Past a few, threads only contend for the GIL: more
    # throughput comes from more processes (`posegen api --workers N`).
    api_threads: int = Field(default=8, ge=1, le=256)
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    rate_limit_per_minute: Annotated[dict[str, int], NoDecode] = Field(default=DEFAULT_RATE_LIMITS)
    list_limit_max: int = 100
    # Seconds between the `: keep-alive` comments of an idle event stream (proxies close
    # connections that say nothing for a while).
    stream_keepalive_seconds: float = Field(default=15.0, gt=0, le=3600)
    # Browser origins allowed to call the API (CORS); empty: no CORS headers at all.
    cors_origins: Annotated[list[str], NoDecode] = Field(default=[])

    # -- scheduling (posegen.scheduler) ------------------------------------------------------
    # Queued jobs a user may have at once, per tier (0: unlimited): beyond, 429 queue_full.
    max_queued_per_user: Annotated[dict[str, int], NoDecode] = Field(default=DEFAULT_QUEUED_LIMITS)
    # Queued jobs per model (0: unlimited): beyond, 503 overloaded.
    max_queue_depth: int = Field(default=10_000, ge=0)
    # A worker keeps to the models it holds loaded unless another model's job has waited
    # longer than this many seconds.
    affinity_max_wait: float = Field(default=30.0, ge=0)
    # The models a GPU worker serves (`posegen worker --models`); empty: every enabled model.
    worker_models: Annotated[list[str], NoDecode] = Field(default=[])

    # -- hosted providers (posegen.hosted, posegen.routing) -----------------------------------
    # The Hugging Face Inference API: `POST {hf_api_url}/models/{remote_model}`.
    hf_api_url: str = "https://api-inference.huggingface.co"
    # Its bearer token: a secret, never logged nor shown (SecretStr prints as stars).
    hf_api_token: SecretStr | None = None
    # Hosted jobs one remote worker process has in flight at once (`posegen worker --queues
    # remote`: Celery's thread pool, as they wait on the network, not on a GPU).
    remote_concurrency: int = Field(default=16, ge=1, le=512)
    # A queued job of a local model with a `fallback_model_key` that has waited longer than
    # this is routed to its hosted fallback by the reconciler; unset: never by waiting.
    fallback_after_seconds: float | None = Field(default=None, ge=0)

    # -- webhooks -----------------------------------------------------------------------------
    webhook_allow_private: bool = False
    webhook_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default=[5, 30, 120, 600, 3600, 21600, 86400]
    )
    webhook_timeout: float = 10.0
    webhook_sweep_interval: float = 5.0
    # At most one `generation.progress` webhook per job this often (seconds).
    webhook_progress_interval: float = Field(default=2.0, gt=0)
    # Deliveries in flight at once to one endpoint (scheme, host, port), per worker process.
    webhook_endpoint_concurrency: int = Field(default=4, ge=1, le=100)
    # Failed attempts in a row that pause an endpoint (its circuit opens) for the retry
    # schedule's next step.
    webhook_circuit_failures: int = Field(default=5, ge=1)

    # -- reliability --------------------------------------------------------------------------
    reconcile_interval: float = 30.0
    job_lease_seconds: float = 60.0
    # A queued job whose message may have been lost is re-published after this long.
    requeue_after_seconds: float = 120.0
    max_attempts: int = Field(default=3, ge=1)
    # How long a worker holds a job while storage is unreachable (an input it cannot read, an
    # output it cannot write), retrying with backoff, before it gives the job back to the
    # queue: an interruption, counted against max_attempts. Well under the shortest soft time
    # limit (60 s), which the input's retries count against.
    storage_retry_seconds: float = Field(default=30.0, ge=0, le=300)
    job_soft_time_limit: float = 900.0
    job_hard_time_limit: float = 960.0
    idempotency_ttl_seconds: int = 24 * 3600
    # How often a running job writes progress and renews its lease.
    heartbeat_seconds: float = 0.5
    # Outputs older than this many days are deleted as `DELETE /v1/generations/{id}` does
    # (posegen.retention); unset: kept until their owner deletes them.
    output_retention_days: int | None = Field(default=None, ge=1)

    log_json: bool = True
    log_level: str = "INFO"

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _parse_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            return [float(part) for part in value.split(",") if part.strip()]
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().rstrip("/") for part in value.split(",") if part.strip()]
        return value

    @field_validator(
        "output_retention_days", "fallback_after_seconds", "hf_api_token", mode="before"
    )
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        # `POSEGEN_OUTPUT_RETENTION_DAYS=` (set, but empty: as an env file may leave it)
        # means unset.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("worker_models", mode="before")
    @classmethod
    def _parse_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("rate_limit_per_minute", mode="before")
    @classmethod
    def _parse_rate_limits(cls, value: object) -> object:
        return _per_tier(value, DEFAULT_RATE_LIMITS)

    @field_validator("max_queued_per_user", mode="before")
    @classmethod
    def _parse_queued_limits(cls, value: object) -> object:
        return _per_tier(value, DEFAULT_QUEUED_LIMITS)

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url or self.broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return self.var_dir / "broker"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _per_tier(value: object, defaults: dict[str, int]) -> object:
    """A limit per tier: "free=30,basic=120" (the tiers not named keep their defaults) or a
    single number for every tier; 0 means unlimited."""
    if isinstance(value, str):
        value = value.strip()
        if "=" not in value:
            return dict.fromkeys(defaults, int(value))
        pairs = (part.split("=", 1) for part in value.split(",") if part.strip())
        value = {k.strip(): int(v) for k, v in pairs}
    if isinstance(value, dict):
        unknown = set(value) - set(defaults)
        if unknown:
            raise ValueError(f"unknown tier {sorted(unknown)[0]!r}")
        return {**defaults, **value}
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
