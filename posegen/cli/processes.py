"""`posegen api`, `posegen worker`, `posegen beat`, `posegen demo`."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from posegen.cli.common import settings
from posegen.queue import GENERATION_QUEUE, REMOTE_QUEUE
from posegen.settings import Settings


def gpu_count() -> int:
    """GPUs on this machine, without initialising CUDA in this (parent) process."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _multiprocess_metrics(port: int) -> None:
    """Prefork children record into files that the parent serves. Must run before anything
    imports prometheus_client: it picks its value class from this variable at import."""
    import shutil
    import sys

    assert "prometheus_client" not in sys.modules, "prometheus_client imported too early"
    folder = (settings().var_dir / "metrics" / f"worker-{os.getpid()}").resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)  # noqa: TID251 - for prometheus_client

    from celery import signals
    from prometheus_client import multiprocess

    from posegen.metrics import serve_multiprocess

    @signals.worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _child_gone(pid: int | None = None, **_: object) -> None:
        multiprocess.mark_process_dead(pid or os.getpid(), str(folder))

    serve_multiprocess(port)


def _log_start(s: Settings, *, queues: list[str], concurrency: int) -> None:
    """The banner's facts as one log line, once Celery has set up logging and the worker."""
    import logging

    from celery import signals

    from posegen.queue import broker_url

    @signals.celeryd_after_setup.connect(weak=False)  # type: ignore[untyped-decorator]
    def _started(sender: str, instance: object, conf: object, **_: object) -> None:
        logging.getLogger("posegen.worker").info(
            "worker starting",
            extra={
                "worker": sender,
                "queues": queues,
                "concurrency": concurrency,
                # The transport only: a URL's credentials stay out of the logs.
                "broker": broker_url(s).split("://", 1)[0],
            },
        )


def _preload_engine() -> None:
    """Each GPU child imports torch and diffusers as it starts, after the fork, never inside
    a task: a time limit that fired in the middle of `import torch` would leave the process
    broken, and the first job would pay seconds of imports."""
    from celery import signals

    @signals.worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _warm(**_: object) -> None:
        from worker.context import context

        context().warm()


def _serve_models(models: str) -> list[str]:
    """The generation queues of the models this worker serves (`--models`, else every
    enabled model), its processes told which those are (POSEGEN_WORKER_MODELS)."""
    from sqlalchemy.orm import Session

    from db.session import make_engine
    from posegen.catalog import served_models
    from posegen.queue import model_queue
    from posegen.settings import get_settings

    keys = [key.strip() for key in models.split(",") if key.strip()]
    engine = make_engine(settings().database_url, pool_size=1)
    try:
        with Session(engine) as session:
            served = served_models(session, keys)
    finally:
        engine.dispose()
    unknown = sorted(set(keys) - set(served))
    if unknown:
        raise typer.BadParameter(f"unknown model {unknown[0]!r}", param_hint="--models")
    if keys:
        # Read by the processes Celery forks: set before their settings are.
        os.environ["POSEGEN_WORKER_MODELS"] = ",".join(keys)  # noqa: TID251 - for the children
        get_settings.cache_clear()
    return [model_queue(key) for key in sorted(served)]


def run_worker(
    *, queues: list[str], models: str, concurrency: int | None, loglevel: str, metrics_port: int
) -> None:
    if metrics_port:
        _multiprocess_metrics(metrics_port)
    from worker.celery_app import app as celery_app

    gpu_queue = GENERATION_QUEUE in queues
    if gpu_queue:
        queues = [q for q in queues if q != GENERATION_QUEUE] + _serve_models(models)
        _preload_engine()
    elif models:
        raise typer.BadParameter("needs the generation queue", param_hint="--models")
    s = settings()
    remote = REMOTE_QUEUE in queues
    if remote and gpu_queue:
        raise typer.BadParameter("runs apart from the generation queues", param_hint="remote")
    if concurrency is None:
        concurrency = max(1, gpu_count()) if gpu_queue else 4
        concurrency = s.remote_concurrency if remote else concurrency
    name = "gpu" if gpu_queue else ("remote" if remote else "housekeeping")
    # Hosted jobs wait on the network: threads, many at once in one process (worker.remote).
    pool = ["--pool", "threads"] if remote else []
    # With JSON logs, Celery's plain-text banner would be the only lines a log pipeline
    # cannot parse: it is left out, and what it said is one JSON line once the worker is up.
    quiet = ["--quiet"] if s.log_json else []
    if quiet:
        from posegen.logs import configure_logging

        # Now, not when Celery sets logging up: its superuser warning comes before that.
        configure_logging(s, process="worker")
        _log_start(s, queues=queues, concurrency=concurrency)
    celery_app.worker_main(
        [
            *quiet, "worker", "-Q", ",".join(queues), "-c", str(concurrency), *pool,
            "-n", f"{name}-{os.getpid()}@%h", "--loglevel", loglevel,
            "--without-gossip", "--without-mingle",
        ]
    )  # fmt: skip


def run_beat(loglevel: str) -> None:
    from worker.celery_app import app as celery_app

    s = settings()
    s.var_dir.mkdir(parents=True, exist_ok=True)
    quiet = ["--quiet"] if s.log_json else []  # no plain-text banner between JSON lines
    celery_app.start(
        [*quiet, "beat", "--loglevel", loglevel, "-s", str(s.var_dir / "celerybeat-schedule")]
    )


def register_processes(app: typer.Typer) -> None:
    @app.command("api")
    def api(
        host: str = "127.0.0.1",
        port: int = 8000,
        workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
    ) -> None:
        """Run the HTTP API (uvicorn)."""
        import uvicorn

        uvicorn.run(
            "api.app:create_app", factory=True, host=host, port=port, workers=workers,
            log_level="warning", access_log=False, proxy_headers=True,
        )  # fmt: skip

    @app.command("worker")
    def worker(
        queues: Annotated[
            str, typer.Option(help="comma-separated queues; `generation`: the models' queues")
        ] = GENERATION_QUEUE,
        models: Annotated[
            str, typer.Option(help="comma-separated model keys served; default: every model")
        ] = "",
        concurrency: Annotated[
            int | None, typer.Option(help="processes; default: one per GPU")
        ] = None,
        loglevel: str = "INFO",
        metrics_port: Annotated[
            int, typer.Option(help="serve Prometheus metrics of all its processes; 0: off")
        ] = 0,
    ) -> None:
        """Run a Celery worker: the GPU worker by default (every model, or --models);
        the housekeeping worker with --queues webhooks,maintenance; the remote worker for
        hosted models with --queues remote (no GPU; POSEGEN_REMOTE_CONCURRENCY threads)."""
        run_worker(
            queues=queues.split(","), models=models, concurrency=concurrency,
            loglevel=loglevel, metrics_port=metrics_port,
        )  # fmt: skip

    @app.command("beat")
    def beat(loglevel: str = "INFO") -> None:
        """Run Celery beat: the reconciler, the webhook sweep, the purge of expired keys."""
        run_beat(loglevel)

    _register_demo(app)


def _register_demo(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        port: Annotated[int, typer.Option(help="API port; 0 picks a free one")] = 0,
        model_key: Annotated[
            str | None,
            typer.Option(help="default: tiny-sd15-openpose, or sd15-openpose-hf with --hosted"),
        ] = None,
        pose: str = "waving",
        hosted: Annotated[
            bool,
            typer.Option(
                "--hosted",
                help="a hosted model on the remote worker against a loopback Inference API "
                "(no GPU, no weights)",
            ),
        ] = False,
    ) -> None:
        """Everything in one, embedded: migrate, seed, build tiny models, run API + worker,
        submit the astronaut photo with a pose template, follow it, print the output path."""
        from posegen.cli.demo import run_demo

        raise typer.Exit(run_demo(port=port, model_key=model_key, pose=pose, hosted=hosted))
