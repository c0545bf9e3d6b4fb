"""`posegen generate PHOTO --model KEY ...`: one job through the API, from this machine's
command line, with the Python client (so it needs the API's address and a key, not the
database)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import httpx
import typer
from tqdm import tqdm

from posegen.client import ApiError, Client, Job, PosegenClientError
from posegen.client.protocol import output_suffix
from posegen.params import MAX_OUTPUTS

ApiUrl = Annotated[str, typer.Option("--api", envvar="POSEGEN_API_URL", help="The API's base URL.")]
ApiKey = Annotated[str, typer.Option("--key", envvar="POSEGEN_API_KEY", help="An API key.")]


def generate(
    photo: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The subject photo.")],
    model: Annotated[str, typer.Option("--model", help="A model_key (GET /v1/models).")],
    key: ApiKey,
    pose: Annotated[str | None, typer.Option("--pose", help="A pose template's key or id.")] = None,
    pose_image: Annotated[
        Path | None,
        typer.Option(
            "--pose-image", exists=True, dir_okay=False, help="Take the pose of this photo."
        ),
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="The model's default when left out.")] = None,
    steps: Annotated[int | None, typer.Option(min=1, max=150)] = None,
    seed: Annotated[int | None, typer.Option(min=0)] = None,
    outputs: Annotated[
        int | None,
        typer.Option(
            "--outputs", min=1, max=MAX_OUTPUTS, help="Images to make (seeds seed, seed+1, ...)."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write the image.")] = None,
    api: ApiUrl = "http://127.0.0.1:8000",
) -> None:
    """Submit PHOTO, follow the job (queue position, then a progress bar) and write the
    image. With neither --pose nor --pose-image, the pose is taken from PHOTO itself."""
    if pose and pose_image:
        raise typer.BadParameter("give --pose or --pose-image, not both")
    with Client(api, key) as client:
        try:
            job = client.submit(
                photo,
                model_key=model,
                pose_image=pose_image,
                pose_template_id=pose,
                prompt=prompt,
                num_inference_steps=steps,
                seed=seed,
                num_outputs=outputs,
            )
            job = _follow(client, job)
            _finish(client, job, out)
        except ApiError as exc:
            _fail(exc.message)
        except (PosegenClientError, httpx.TransportError) as exc:
            _fail(f"{api}: {exc}")


def _follow(client: Client, job: Job) -> Job:
    with tqdm(total=1, unit="step", desc="submitted", leave=True) as bar:

        def show(update: Job) -> None:
            progress = update["progress"]
            if update["status"] == "queued":
                position = update["queue_position"]
                bar.set_description("queued" if position is None else f"queued, {position} ahead")
            else:
                bar.set_description(update["status"])
            if progress["total"]:
                bar.total = progress["total"]
                bar.n = progress["step"] if update["status"] != "completed" else bar.total
            bar.refresh()

        try:
            return client.wait(job["id"], on_update=show)
        except KeyboardInterrupt:
            client.cancel(job["id"])
            typer.echo(f"job {job['id']} canceled", err=True)
            raise typer.Exit(130) from None


def _finish(client: Client, job: Job, out: Path | None) -> None:
    if job["status"] != "completed":
        error = job["error"]
        reason = f": {error['message']} ({error['code']})" if error else ""
        _fail(f"job {job['id']} {job['status']}{reason}")
    for output in job["outputs"]:
        index = output["index"]
        path = out or Path(f"{job['id']}{output_suffix(job, index)}")
        if index:
            path = path.with_name(f"{path.stem}-{index}{path.suffix}")
        client.download(job["id"], index, path)
        typer.echo(f"wrote {path} ({output['width']}x{output['height']})")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)
