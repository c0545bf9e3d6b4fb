"""The embedded end-to-end demo: SQLite, the filesystem broker, tiny models, local disk."""

from __future__ import annotations

import io
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
from posegen.storage.local import LocalStorage

DEMO_EMAIL = "demo@posegen.local"


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


def _prepare() -> str:
    s = settings()
    s.var_dir.mkdir(parents=True, exist_ok=True)
    _step(f"database: {s.database_url}")
    upgrade_database(s.database_url)
    with unit_of_work() as session:
        typer.echo(f"    models: {seeding.seed_models(session).summary()}")
        typer.echo(f"    pose templates: {seeding.seed_poses(session).summary()}")
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


def _start(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "posegen.cli.main", *args], stdout=log, stderr=subprocess.STDOUT
    )


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


def run_demo(*, port: int, model_key: str, pose: str) -> int:
    s = settings()
    raw_key = _prepare()
    port = port or _free_port()
    base = f"http://127.0.0.1:{port}"
    logs = s.var_dir / "logs"
    _step(f"starting the API on {base} and a worker (logs in {logs})")
    api = _start(["api", "--port", str(port)], logs / "api.log")
    worker = _start(["worker", "--concurrency", "1"], logs / "worker.log")
    try:
        _wait_healthy(base, api, logs / "api.log")
        headers = {"Authorization": f"Bearer {raw_key}"}
        _step(f"submitting the astronaut photo with the {pose!r} pose to {model_key}")
        response = httpx.post(
            f"{base}/v1/generations",
            headers=headers,
            files={"image": ("astronaut.png", _astronaut_png(), "image/png")},
            data={
                "model_key": model_key,
                "pose_template_id": pose,
                "num_inference_steps": "4",
                "seed": "42",
            },
            timeout=30,
        )
        if response.status_code != 202:
            typer.secho(
                f"submit failed: {response.status_code} {response.text}",
                fg=typer.colors.RED,
                err=True,
            )
            return 1
        job = response.json()
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
        for proc in (api, worker):
            proc.terminate()
        for proc in (api, worker):
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
            state = (job["status"], progress["step"], progress["total"])
            if state == shown:
                time.sleep(0.1)
                continue
            shown = state
            if progress["total"]:
                bar.total = progress["total"]
                bar.n = progress["step"]
            bar.set_description(str(job["status"]))
            bar.refresh()
            if job["status"] in ("completed", "failed", "canceled"):
                if job["status"] == "completed":
                    bar.n = bar.total or 1
                    bar.refresh()
                return job
            time.sleep(0.2)
    raise RuntimeError("the job did not finish in time")
