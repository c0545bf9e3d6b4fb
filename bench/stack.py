"""A real stack for the benchmarks: a fresh Postgres database (Alembic + seeds), Redis, and
`posegen api` / `posegen worker` processes. Everything on loopback; torn down at the end."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get(
    "POSEGEN_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("POSEGEN_BENCH_REDIS", "redis://127.0.0.1:6379/12")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def small_png(size: tuple[int, int] = (96, 96)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (120, 90, 60)).save(buf, format="PNG")
    return buf.getvalue()


def astronaut_png() -> bytes:
    """skimage's astronaut (a real, public-domain photo of a person, 512x512) as PNG bytes."""
    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="PNG")
    return buf.getvalue()


def phone_photo_jpeg(size: tuple[int, int] = (4032, 3024)) -> bytes:
    """What a phone uploads: the astronaut enlarged to 12 megapixels, as a JPEG (about 1 MB)."""
    import skimage.data
    from PIL import Image

    photo = Image.fromarray(skimage.data.astronaut()).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def fitted_astronaut(width: int, height: int) -> bytes:
    """The astronaut as the API stores it for a model of this size (fitted at submit)."""
    from posegen.images import check_upload

    return check_upload(astronaut_png(), max_pixels=10**8, fit_to=(width, height)).png


@dataclass
class Stack:
    env: dict[str, str]
    database_url: str
    var: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        out = (self.var / f"{log}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "posegen.cli.main", *args],
            env={**os.environ, **self.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def api(self, *, workers: int = 1) -> str:
        port = free_port()
        self.start("api", "--port", str(port), "--workers", str(workers), log="api")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    return base
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("API did not start")

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "posegen.cli.main", *args],
            env={**os.environ, **self.env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    def user_key(self, *, credits: int = 10_000_000, tier: str = "enterprise") -> str:
        email = f"bench-{uuid.uuid4().hex[:8]}@example.com"
        self.cli("users", "create", email, "--tier", tier, "--credits", str(credits))
        return self.cli("keys", "create", email).strip().splitlines()[-1]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def stack(**overrides: str) -> Iterator[Stack]:
    from posegen.cli.common import upgrade_database

    name = f"posegen_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    var = Path(tempfile.mkdtemp(prefix="posegen-bench-"))
    env = {
        "POSEGEN_DATABASE_URL": url,
        "POSEGEN_BROKER_URL": REDIS_URL,
        "POSEGEN_STORAGE_URL": f"file://{var / 'storage'}",
        "POSEGEN_MODEL_DIR": str(var / "models"),
        "POSEGEN_VAR_DIR": str(var),
        "POSEGEN_POSE_BACKEND": "mediapipe",
        "POSEGEN_RATE_LIMIT_PER_MINUTE": "100000000",
        # The benches fill queues far past any production limit on purpose.
        "POSEGEN_MAX_QUEUED_PER_USER": "0",
        "POSEGEN_MAX_QUEUE_DEPTH": "0",
        "POSEGEN_LOG_LEVEL": "WARNING",
        **overrides,
    }
    redis.Redis.from_url(REDIS_URL).flushdb()
    upgrade_database(url)
    s = Stack(env=env, database_url=url, var=var)
    s.cli("seed", "models")
    s.cli("seed", "poses")
    try:
        yield s
    finally:
        s.stop()
        redis.Redis.from_url(REDIS_URL).flushdb()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]
