"""The embedded end-to-end demo: SQLite, the filesystem broker, tiny models, local disk.

With `--hosted`, no GPU and no model weights at all: a hosted model (`sd15-openpose-hf`) run by
the remote worker against a loopback Inference API that this process serves
(posegen.loopback), cold for a few seconds so the wait shows."""

from __future__ import annotations

import io
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import typer
from tqdm import tqdm

from posegen import accounts, credits, seeding
from posegen.cli.common import settings, unit_of_work, upgrade_database
from posegen.errors import NotFound
from posegen.loopback import LoopbackProvider
from posegen.storage.local import LocalStorage

DEMO_EMAIL = "demo@posegen.local"
LOCAL_MODEL, HOSTED_MODEL = "tiny-sd15-openpose", "sd15-openpose-hf"
# How long the loopback provider's model "loads" (503 with estimated_time) in the hosted demo.
COLD_SECONDS = 3.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _astronaut_png() -> bytes:
    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="PNG")
    return buf.getvalue()


def _step(message: str) -> None:
    typer.secho(f"==> {message}", fg=typer.colors.CYAN)


def _prepare(*, tiny: bool) -> str:
    s = settings()
    s.var_dir.mkdir(parents=True, exist_ok=True)
    _step(f"database: {s.database_url}")
    upgrade_database(s.database_url)
    with unit_of_work() as session:
        typer.echo(f"    models: {seeding.seed_models(session).summary()}")
        typer.echo(f"    pose templates: {seeding.seed_poses(session).summary()}")
    if tiny:
        _step(f"tiny models in {s.model_dir}")
        from worker.engine.tiny import build_tiny

        built = build_tiny(s.model_dir)
        typer.echo(f"    {'built ' + ', '.join(p.name for p in built) if built else 'present'}")
    with unit_of_work() as session:
        try:
            user = accounts.user_by_email(session, DEMO_EMAIL)
        except NotFound:
            user = accounts.create_user(session, email=DEMO_EMAIL, tier="free")
        if user.credits < 10:
            credits.grant(session, user_id=user.id, amount=100, note="demo")
        raw_key = accounts.create_key(session, email=DEMO_EMAIL, name="demo").raw
    _step(f"user {DEMO_EMAIL} with an API key")
    return raw_key


def _start(
    args: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "posegen.cli.main", *args], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, **env} if env else None,  # noqa: TID251 - a child process's
    )  # fmt: skip


def _start_worker(logs: Path, provider: LoopbackProvider | None) -> subprocess.Popen[bytes]:
    """The GPU worker, or for a hosted model the remote worker, told where the loopback
    provider is and its token (through the environment: never on a command line)."""
    if provider is None:
        return _start(["worker", "--concurrency", "1"], logs / "worker.log")
    _step(f"a loopback Inference API on {provider.url} (its model cold for {COLD_SECONDS:.0f} s)")
    env = {"POSEGEN_HF_API_URL": provider.url, "POSEGEN_HF_API_TOKEN": provider.token}
    return _start(["worker", "--queues", "remote"], logs / "remote-worker.log", env)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_healthy(
    base: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the API process exited ({proc.returncode}); the end of {log_path}:\n"
                + _tail(log_path)
            )
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the API did not become healthy in time")


def run_demo(*, port: int, model_key: str | None, pose: str, hosted: bool = False) -> int:
    s = settings()
    model_key = model_key or (HOSTED_MODEL if hosted else LOCAL_MODEL)
    raw_key = _prepare(tiny=not hosted)
    port = port or _free_port()
    base = f"http://127.0.0.1:{port}"
    logs = s.var_dir / "logs"
    provider = None
    if hosted:
        token = f"hf_demo_{secrets.token_urlsafe(16)}"
        provider = LoopbackProvider(token=token, cold_seconds=COLD_SECONDS).start()
    _step(f"starting the API on {base} and a worker (logs in {logs})")
    api = _start(["api", "--port", str(port)], logs / "api.log")
    worker = _start_worker(logs, provider)
    try:
        _wait_healthy(base, api, logs / "api.log")
        headers = {"Authorization": f"Bearer {raw_key}"}
        _step(f"submitting the astronaut photo with the {pose!r} pose to {model_key}")
        job = _submit(base, headers, model_key=model_key, pose=pose)
        if job is None:
            return 1
        job = _follow(base, headers, job)
        if job["status"] != "completed":
            typer.secho(
                f"job {job['id']} {job['status']}: {job['error']}", fg=typer.colors.RED, err=True
            )
            return 1
        storage = LocalStorage(s.storage_url.removeprefix("file://"))
        path = storage.local_path(f"outputs/{job['id']}/0.png")
        out = job["outputs"][0]
        _step(f"job {job['id']} completed: {out['width']}x{out['height']} PNG")
        typer.echo(f"output: {path}")
        return 0
    finally:
        _stop([api, worker])
        if provider is not None:
            provider.stop()


def _submit(
    base: str, headers: dict[str, str], *, model_key: str, pose: str
) -> dict[str, Any] | None:
    response = httpx.post(
        f"{base}/v1/generations",
        headers=headers,
        files={"image": ("astronaut.png", _astronaut_png(), "image/png")},
        data={"model_key": model_key, "pose_template_id": pose, "num_inference_steps": "4",
              "seed": "42"},
        timeout=30,
    )  # fmt: skip
    if response.status_code != 202:
        typer.secho(
            f"submit failed: {response.status_code} {response.text}", fg=typer.colors.RED, err=True
        )
        return None
    job: dict[str, Any] = response.json()
    return job


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _follow(
    base: str, headers: dict[str, str], job: dict[str, Any], timeout: float = 300
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    shown: tuple[object, ...] = ()
    with tqdm(total=1, desc="queued", unit="step", leave=True) as bar:
        while time.monotonic() < deadline:
            job = httpx.get(
                f"{base}/v1/generations/{job['id']}", headers=headers, timeout=10
            ).json()
            progress = job["progress"]
            assert isinstance(progress, dict)
            phase = progress.get("phase")
            state = (job["status"], progress["step"], progress["total"], phase)
            if state == shown:
                time.sleep(0.1)
                continue
            shown = state
            if progress["total"]:
                bar.total = progress["total"]
                bar.n = progress["step"]
            waiting = f" ({phase}, about {job['eta_seconds']:.0f} s)" if phase else ""
            bar.set_description(f"{job['status']}{waiting}")
            bar.refresh()
            if job["status"] in ("completed", "failed", "canceled"):
                if job["status"] == "completed":
                    bar.n = bar.total or 1
                    bar.refresh()
                return job
            time.sleep(0.2)
    raise RuntimeError("the job did not finish in time")
