"""Batches (#24): the engine's pace per batch size, and the whole stack's with a backlog.

  python -m bench.batches sweep [--full] --family sd15 --size 512 --steps 20 --batches 1,2,4,8
      one pipeline call of N images per batch size: it/s (denoising steps a second), images/s,
      seconds an image, peak GPU memory; --dtype fp16|bf16, --compile [--compile-mode M].
  python -m bench.batches stack [--full] --family sd15 --size 512 --jobs 32 --max-batch 4
      the embedded stack (SQLite, the serverless broker, local storage: what `posegen demo`
      runs, no Postgres or Redis needed) with a backlog of jobs queued before a worker starts
      (POSEGEN_MAX_BATCH): images/s from the first start to the last completion, against a
      bare loop of the same pipeline calls in this process, and the GPU's busy fraction
      meanwhile (nvidia-smi samples; null without a GPU).
Without --full the tiny models (random, 128 px unless --size): the code path, not the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.engine import STANDING, fitted_astronaut

ROOT = Path(__file__).resolve().parent.parent


def _models(args: argparse.Namespace, model_dir: Path) -> tuple[str, str]:
    if args.full:
        from bench.full_models import build_full

        return build_full(args.family, model_dir)
    from worker.engine.tiny import build_tiny

    build_tiny(model_dir)
    return f"tiny-{args.family}", f"tiny-{args.family}-controlnet"


def _engine(args: argparse.Namespace, model_dir: Path) -> Any:
    from worker.engine.engine import Engine, EngineConfig

    return Engine(
        EngineConfig(
            model_dir=model_dir, device=args.device, dtype=args.dtype, pose_backend="mediapipe",
            compile=args.compile, compile_mode=args.compile_mode,
        )
    )  # fmt: skip


def _job(args: argparse.Namespace, base: str, controlnet: str, seed: int) -> Any:
    from worker.engine.engine import EngineJob
    from worker.engine.run import RunParams

    params = RunParams(
        prompt="a portrait avatar of a person", negative_prompt="blurry",
        num_inference_steps=args.steps, guidance_scale=7.5, controlnet_conditioning_scale=1.0,
        strength=1.0, seed=seed, width=args.size, height=args.size,
    )  # fmt: skip
    return EngineJob(
        model_key="bench", family=args.family, base_model=base, controlnet_model=controlnet,
        params=params, image=fitted_astronaut(args.size, args.size), pose_keypoints=STANDING,
    )  # fmt: skip


def _peak_reset(engine: Any) -> None:
    import torch

    if engine.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(engine: Any) -> float | None:
    import torch

    if not engine.device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 1024**3, 3)


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="posegen-bench-"))
    base, controlnet = _models(args, model_dir)
    engine = _engine(args, model_dir)
    rows = []
    for size in args.batches:
        batch = [engine.prepare(_job(args, base, controlnet, seed)) for seed in range(size)]
        for _ in range(2):  # warm-up: the allocator, kernels, a compile or graph capture
            engine.run(batch)
        _peak_reset(engine)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            engine.run(batch)
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        rows.append({
            "batch": size, "call_s_median": round(median, 4),
            "it_per_s": round(args.steps / median, 2), "images_per_s": round(size / median, 3),
            "s_per_image": round(median / size, 4), "peak_gib": _peak_gib(engine),
        })  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr)
    best = max(rows, key=lambda row: row["images_per_s"])
    return {
        "benchmark": "batches.sweep", "device": engine.device, "dtype": str(engine.dtype),
        "family": args.family, "full_size": args.full, "size": args.size, "steps": args.steps,
        "compile": args.compile and args.compile_mode, "by_batch": rows,
        "best_batch": best["batch"],
        "best_over_batch_1": round(best["images_per_s"] / rows[0]["images_per_s"], 3),
    }  # fmt: skip


class GpuBusy:
    """nvidia-smi's utilization.gpu sampled every 100 ms on a thread (None without it)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> GpuBusy:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.wait(0.1):
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                self.samples.append((time.time(), float(out.split()[0]) / 100))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return

    def between(self, start: float, end: float) -> float | None:
        inside = [busy for at, busy in self.samples if start <= at <= end]
        return round(statistics.mean(inside), 3) if inside else None


def _stack_env(args: argparse.Namespace, var: Path, model_dir: Path) -> dict[str, str]:
    """The embedded stack's settings; with --compile the worker compiles the bench model at
    batch 1 to --max-batch as it starts (worker.engine.warmup), before its first claim."""
    return {
        **os.environ, "PYTHONPATH": str(ROOT), "POSEGEN_DATABASE_URL": f"sqlite:///{var}/pg.db",
        "POSEGEN_BROKER_URL": "", "POSEGEN_VAR_DIR": str(var),
        "POSEGEN_STORAGE_URL": f"file://{var}/storage", "POSEGEN_MODEL_DIR": str(model_dir),
        "POSEGEN_POSE_BACKEND": "mediapipe", "POSEGEN_MAX_BATCH": str(args.max_batch),
        "POSEGEN_MAX_QUEUED_PER_USER": "0", "POSEGEN_RATE_LIMIT_PER_MINUTE": "0",
        "POSEGEN_LOG_JSON": "true", "POSEGEN_DTYPE": args.dtype,
        "POSEGEN_COMPILE": str(args.compile).lower(), "POSEGEN_COMPILE_MODE": args.compile_mode,
    }  # fmt: skip


def _warm_up_s(log: Path) -> float | None:
    """The seconds the worker's compile warm-up took ("model compiled"), None without one."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"model compiled"' in line:
            return round(float(json.loads(line)["seconds"]), 1)
    return None


def _queue_backlog(args: argparse.Namespace, base: str, controlnet: str) -> list[str]:
    """The catalog, a bench model on these weights, a user, and `args.jobs` queued jobs (as
    the API submits them, with the embedded broker's messages): their ids."""
    from db.models import AiModel
    from posegen import accounts, jobs, seeding
    from posegen.cli.common import settings, unit_of_work, upgrade_database
    from posegen.params import GenerationParams
    from posegen.storage import storage_from_settings

    s = settings()
    upgrade_database(s.database_url)
    with unit_of_work() as session:
        seeding.seed_models(session)
        seeding.seed_poses(session)
        template = session.get_one(AiModel, _model_id(session, f"tiny-{args.family}-openpose"))
        model = AiModel(**{
            c.key: getattr(template, c.key) for c in AiModel.__table__.columns if c.key != "id"
        })  # fmt: skip
        model.model_key, model.base_model, model.controlnet_model = "bench", base, controlnet
        model.resolution, model.default_steps = f"{args.size}x{args.size}", args.steps
        session.add(model)
        accounts.create_user(session, email="bench@example.com", credits=10**6)
    ids = []
    storage = storage_from_settings(s)
    photo = fitted_astronaut(args.size, args.size)
    for seed in range(args.jobs):
        with unit_of_work() as session:
            user = accounts.user_by_email(session, "bench@example.com")
            request = jobs.GenerationRequest(
                model_key="bench", image=photo, pose_template_id="standing",
                params=GenerationParams(seed=seed, strength=1.0),
            )  # fmt: skip
            submitted = jobs.submit(session, user=user, request=request, storage=storage,
                                    settings=s)  # fmt: skip
            ids.append(submitted.job.id)
    return ids


def _model_id(session: Any, key: str) -> str:
    from sqlalchemy import select

    from db.models import AiModel

    return str(session.scalar(select(AiModel.id).where(AiModel.model_key == key)))


def stack(args: argparse.Namespace) -> dict[str, Any]:
    """The backlog through a real worker process, then the same calls bare, here."""
    var = Path(tempfile.mkdtemp(prefix="posegen-stack-"))
    model_dir = args.model_dir or var / "models"
    base, controlnet = _models(args, model_dir)
    env = _stack_env(args, var, model_dir)
    os.environ.update(env)  # this process submits to the same database and broker
    ids = _queue_backlog(args, base, controlnet)
    log = (var / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "posegen.cli.main", "worker", "--concurrency", "1",
         "--models", "bench"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        with GpuBusy() as busy:
            first, last = _wait_done(ids, timeout=args.timeout)
    finally:
        os.killpg(worker.pid, 15)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:  # its warm shutdown hung on a message just received
            os.killpg(worker.pid, 9)
            worker.wait()
    stack_rate = len(ids) / (last - first)
    engine = _engine(args, model_dir)
    jobs = [_job(args, base, controlnet, seed) for seed in range(len(ids))]
    # The load and warm-up the worker paid before its first claim: each batch size once.
    for size in sorted(
        {len(jobs[at : at + args.max_batch]) for at in range(0, len(jobs), args.max_batch)}
    ):
        engine.run([engine.prepare(job) for job in jobs[:size]])
    started = time.perf_counter()
    for at in range(0, len(jobs), args.max_batch):
        engine.run([engine.prepare(job) for job in jobs[at : at + args.max_batch]])
    bare_rate = len(jobs) / (time.perf_counter() - started)
    return {
        "benchmark": "batches.stack", "family": args.family, "full_size": args.full,
        "size": args.size, "steps": args.steps, "jobs": len(ids), "max_batch": args.max_batch,
        "stack_images_per_s": round(stack_rate, 3), "bare_images_per_s": round(bare_rate, 3),
        "ratio_stack_over_bare": round(stack_rate / bare_rate, 3),
        "gpu_busy_fraction": busy.between(first, last), "worker_log": str(var / "worker.log"),
        "compile": args.compile and args.compile_mode,
        "compile_warm_up_s": _warm_up_s(var / "worker.log"),
    }  # fmt: skip


def _wait_done(ids: list[str], *, timeout: float) -> tuple[float, float]:
    """(first start, last finish) as unix times, once every job completed."""
    from sqlalchemy import func, select

    from db.models import Generation
    from posegen.cli.common import unit_of_work

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with unit_of_work() as session:
            statuses = session.execute(
                select(Generation.status, func.count()).group_by(Generation.status)
            ).all()
            counts = dict(statuses)
            if counts.get("completed", 0) == len(ids):
                first, last = session.execute(
                    select(func.min(Generation.started_at), func.max(Generation.finished_at))
                ).one()
                return _unix(first), _unix(last)
            if counts.get("failed") or counts.get("canceled"):
                raise RuntimeError(f"jobs did not complete: {counts}")
        time.sleep(0.2)
    raise TimeoutError(f"the backlog was not done in {timeout} s")


def _unix(when: Any) -> float:
    import datetime as dt

    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return float(when.timestamp())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["sweep", "stack"])
    parser.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
    parser.add_argument("--full", action="store_true", help="full-size random-weight configs")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")],
                        default=[1, 2, 4, 8])  # fmt: skip
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--model-dir", type=Path, default=None)
    args = parser.parse_args()
    result = sweep(args) if args.what == "sweep" else stack(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
