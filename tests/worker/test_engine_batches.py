"""Batches on the tiny models (CPU): several outputs of one job, and several jobs in one
pipeline call, each image equal to the one its job makes alone (within 2/255: batched kernels
round differently), with per-job previews; and the compiled path's wiring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.factories import astronaut_png, png_bytes
from tests.worker.test_engine import job, params
from worker.engine.device import CompileOptions, _clone_outputs, compile_module, configure_dynamo
from worker.engine.engine import Engine, EngineConfig

TOLERANCE = 2  # of 255, per channel


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def close(a: Image.Image, b: Image.Image) -> bool:
    difference = np.abs(pixels(a) - pixels(b))
    return bool(difference.max() <= TOLERANCE)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    return Engine(EngineConfig(model_dir=model_dir, pose_backend="mediapipe"))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_output_i_is_the_job_alone_with_seed_plus_i(engine, family):
    result = engine.generate(job(family, params=params(seed=40, num_outputs=3)))
    assert len(result.images) == 3 and len(result.pngs) == 3
    alone = [engine.generate(job(family, params=params(seed=40 + i))).image for i in range(3)]
    for i in range(3):
        assert close(result.images[i], alone[i]), f"output {i}"
    # Not one image three times: the seeds differ.
    assert not close(result.images[0], result.images[1])


def test_jobs_in_one_call_each_make_their_own_images(engine):
    jobs = [
        job(params=params(prompt="a person", seed=7)),
        job(params=params(prompt="a robot", seed=7, num_outputs=2), pose_keypoints=None),
        job(params=params(prompt="a dancer", seed=99), image=png_bytes(color=(200, 40, 40))),
    ]
    steps: list[tuple[int, int]] = []
    prepared = [engine.prepare(j) for j in jobs]
    results = engine.run(prepared, on_step=lambda s, t: steps.append((s, t)))
    assert [len(r.images) for r in results] == [1, 2, 1]
    for j, batched in zip(jobs, results, strict=True):
        alone = engine.generate(j)
        for i, image in enumerate(batched.images):
            assert close(image, alone.images[i])
    assert steps[0] == (0, 2) and steps[-1] == (2, 2)  # one progress for the whole call


def test_a_batch_that_runs_out_of_memory_twice_runs_its_images_one_by_one(engine):
    """The second attempt of a call that ran out of memory (as the engine's out-of-memory test
    injects one) makes a call for each image: each still its job's image alone."""
    import torch

    jobs = [job(params=params(seed=7)), job(params=params(seed=8, num_outputs=2))]
    steps: list[tuple[int, int]] = []

    def oom_once(step: int, total: int) -> None:
        steps.append((step, total))
        if len(steps) == 2:  # the first attempt's first step
            raise torch.OutOfMemoryError("CUDA out of memory (raised by the test)")

    results = engine.run([engine.prepare(j) for j in jobs], on_step=oom_once)
    # Three calls of one image after the failed one: the progress spread over them, in order.
    assert len(steps) == 2 + 3 * 2 and steps[-1] == (2, 2)
    assert [s for s, _ in steps[2:]] == sorted(s for s, _ in steps[2:])
    for j, batched in zip(jobs, results, strict=True):
        alone = engine.generate(j)
        assert len(batched.images) == len(alone.images)
        for i, image in enumerate(batched.images):
            assert close(image, alone.images[i])


def test_a_batch_takes_only_jobs_one_call_can_run(engine):
    for other in (
        job(params=params(num_inference_steps=3)),
        job(params=params(guidance_scale=5.0)),
        job(params=params(negative_prompt="")),
        job("sdxl"),
    ):
        with pytest.raises(ValueError, match="batch_key"):
            engine.run([engine.prepare(job()), engine.prepare(other)])


def test_each_job_of_a_batch_gets_previews_of_its_own_image(engine):
    """Job b's previews are of its image (its offset in the batch is 2, after job a's two
    outputs): the previews the same job gets when it runs alone."""
    first = engine.prepare(job(params=params(seed=1, num_outputs=2)))
    second = engine.prepare(job(params=params(seed=2), image=astronaut_png()))

    def previews(batch: list) -> list[dict[int, Image.Image]]:
        seen: list[dict[int, Image.Image]] = [{} for _ in batch]
        hooks = [lambda s, i, at=at: seen[at].__setitem__(s, i) for at in range(len(batch))]
        engine.run(batch, previews=hooks, preview_interval=0)
        return seen

    batched = previews([first, second])
    assert [sorted(p) for p in batched] == [[1, 2], [1, 2]]
    alone = [previews([first])[0], previews([second])[0]]
    for job_at in (0, 1):
        for step in (1, 2):
            assert close(batched[job_at][step], alone[job_at][step]), (job_at, step)
    assert not close(batched[0][2], batched[1][2])  # two jobs, two images


def test_compile_options_mark_steps_only_in_the_cuda_graph_modes():
    assert CompileOptions("reduce-overhead").cuda_graphs
    assert CompileOptions("max-autotune").cuda_graphs
    assert not CompileOptions("default").cuda_graphs
    assert not CompileOptions("max-autotune-no-cudagraphs").cuda_graphs
    assert CompileOptions("reduce-overhead").kwargs()["mode"] == "reduce-overhead"


def test_the_compiled_path_marks_each_step_and_keeps_the_residuals(model_dir, monkeypatch):
    """torch.compile on the CPU (the eager backend: the wiring, not the kernels): the
    ControlNet's forward is compiled in place, each of its calls marks a step, its outputs
    are the pipeline's own copies, and the image is the eager one."""
    import torch

    marks: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    config = dict(model_dir=model_dir, pose_backend="mediapipe", compile=True)
    compiled = Engine(
        EngineConfig(**config, compile_mode="reduce-overhead", compile_backend="eager")  # type: ignore[arg-type]
    )
    pipe = compiled.pipeline(job())
    assert type(pipe.controlnet).__name__ == "ControlNetModel"  # still itself, for diffusers
    assert hasattr(pipe.controlnet.forward, "_torchdynamo_orig_callable")
    assert hasattr(pipe.unet.forward, "_torchdynamo_orig_callable")
    image = compiled.generate(job(params=params(num_inference_steps=3))).image
    assert len(marks) == 3  # one per denoising step
    # What the scheduler is given of the UNet's is the pipeline's own copy, as the ControlNet's
    # residuals are.
    for module in (pipe.unet, pipe.controlnet):
        assert _clone_outputs in module._forward_hooks.values()
    eager = Engine(EngineConfig(model_dir=model_dir, pose_backend="mediapipe"))
    assert close(image, eager.generate(job(params=params(num_inference_steps=3))).image)


def test_the_step_starting_module_returns_copies_in_the_cuda_graph_modes():
    """What a graph replay writes into is the graph's memory: the module that starts a step
    hands out copies (here a module returning its own buffer stands for that memory)."""
    import torch

    class Held(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("held", torch.ones(3))

        def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
            return [self.held], self.held

    # Each compiled module's (the UNet's too: its output may be kept across steps by the
    # scheduler, as PNDM's `ets`).
    for mode, copied in (("reduce-overhead", True), ("default", False)):
        for starts_step in (True, False):
            module = compile_module(Held(), CompileOptions(mode, "eager"), starts_step=starts_step)
            down, mid = module(torch.zeros(1))
            assert (mid.data_ptr() != module.held.data_ptr()) == copied
            assert (down[0].data_ptr() != module.held.data_ptr()) == copied


def test_a_worker_past_dynamos_limit_of_graphs_says_so(caplog, monkeypatch):
    """Room for a worker's graphs, and a warning of ours once a function passes the limit
    anyway (its calls of new shapes then run uncompiled)."""
    import torch
    import torch._dynamo.config as dynamo

    configure_dynamo()
    assert dynamo.recompile_limit >= 64 and dynamo.accumulated_recompile_limit >= 64
    monkeypatch.setattr(dynamo, "recompile_limit", 1)
    monkeypatch.setattr(dynamo, "automatic_dynamic_shapes", False)

    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    compiled = torch.compile(double, backend="eager")
    for size in (1, 2, 3):
        assert compiled(torch.ones(size)).tolist() == [2.0] * size
    warned = [r for r in caplog.records if r.getMessage().startswith("compile limit hit")]
    assert warned and warned[0].levelname == "WARNING"
