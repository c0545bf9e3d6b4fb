"""The engine's CUDA paths: half precision, SDPA, channels_last, torch.compile, VAE tiling, CPU
offload, a real out-of-memory and the leaked-memory check. Skipped without a CUDA GPU (CI has
none); run on a GPU machine with `pytest tests/worker/test_engine_cuda.py`."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from posegen.errors import JobError
from tests.worker.test_engine import job, params
from worker.engine.engine import Engine, EngineConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MiB = 1024**2


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def gpu_engine(model_dir, **overrides: object) -> Engine:
    return Engine(EngineConfig(model_dir=model_dir, pose_backend="mediapipe", **overrides))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(model_dir) -> Iterator[Engine]:
    engine = gpu_engine(model_dir)
    yield engine
    engine.cache.clear()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cuda_defaults_half_precision_sdpa_channels_last(engine, family):
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert engine.device == "cuda" and engine.dtype == torch.float16  # dtype auto on CUDA
    pipe = engine.pipeline(job(family))
    for model in (pipe.unet, pipe.controlnet):
        assert model.device.type == "cuda" and model.dtype == torch.float16
        assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert all(isinstance(p, AttnProcessor2_0) for p in model.attn_processors.values())
    image = pixels(engine.generate(job(family)).png)
    assert image.shape == (128, 128, 3)
    assert image.std() > 1  # not a flat (NaN -> black) image


def test_same_seed_same_pixels_on_cuda(engine):
    first = engine.generate(job(params=params(seed=11))).png
    assert engine.generate(job(params=params(seed=11))).png == first
    assert engine.generate(job(params=params(seed=12))).png != first


def test_bf16(model_dir):
    engine = gpu_engine(model_dir, dtype="bf16")
    pipe = engine.pipeline(job())
    assert pipe.unet.dtype == torch.bfloat16 and pipe.controlnet.dtype == torch.bfloat16
    assert pixels(engine.generate(job()).png).std() > 1
    engine.cache.clear()


def test_torch_compile_runs_the_compiled_unet_close_to_eager(engine, model_dir):
    compiled = gpu_engine(model_dir, compile=True)
    pipe = compiled.pipeline(job())
    assert isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    first = compiled.generate(job()).png
    assert compiled.generate(job()).png == first  # compiled kernels: still deterministic
    eager = pixels(engine.generate(job()).png)
    # Fused kernels round differently in fp16; random weights amplify little over 2 steps.
    assert np.abs(pixels(first) - eager).mean() < 8
    compiled.cache.clear()


def test_vae_tiling_above_1024_px(engine):
    pipe = engine.pipeline(job())
    seen: list[bool] = []

    def on_step(step: int, total: int) -> None:
        if step >= 1:  # step 0 is announced before the run starts
            seen.append(pipe.vae.use_tiling)

    large = params(width=1088, height=1088)
    result = engine.generate(job(params=large), on_step=on_step)
    assert (result.width, result.height) == (1088, 1088)
    assert seen and all(seen)  # tiled for the whole run
    seen.clear()
    engine.generate(job(), on_step=on_step)
    assert seen and not any(seen)  # and not for a small one


def test_model_cpu_offload_keeps_weights_off_the_gpu(model_dir):
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    engine = gpu_engine(model_dir, cpu_offload=True)
    pipe = engine.pipeline(job())
    assert pipe.unet.device.type == "cpu"  # the weights wait on the CPU
    result = engine.generate(job())
    assert (result.width, result.height) == (128, 128)
    # After the call the hooks moved every model back to the CPU.
    assert all(p.device.type == "cpu" for p in pipe.unet.parameters())
    assert torch.cuda.memory_allocated() - before < 64 * MiB
    engine.cache.clear()


def _peak_bytes(pipe, *, size: int, tiled: bool) -> int:
    """Peak GPU memory of one diffusers call above what was allocated before it."""
    from posegen.images import fit
    from posegen.skeleton import draw_skeleton
    from tests.factories import astronaut_png
    from tests.worker.test_engine import STANDING
    from worker.engine.run import run_pipeline

    subject = fit(Image.open(io.BytesIO(astronaut_png())).convert("RGB"), width=size, height=size)
    control = draw_skeleton(STANDING, width=size, height=size)
    if tiled:
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    run_pipeline(
        pipe, init_image=subject, control_image=control, params=params(width=size, height=size)
    )
    torch.cuda.synchronize()
    pipe.vae.disable_tiling()
    return torch.cuda.max_memory_allocated() - start


def _hog(leave: int) -> torch.Tensor:
    """Take all free GPU memory but `leave` bytes."""
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info()
    return torch.empty(max(0, free - leave), dtype=torch.uint8, device="cuda")


def test_a_real_oom_retries_with_less_memory_and_succeeds(model_dir):
    """Free memory between what a 1024 px run needs plain and what it needs with the VAE
    tiled: the first attempt runs out, the tiled retry completes."""
    engine = gpu_engine(model_dir)
    big = job(params=params(width=1024, height=1024))
    pipe = engine.pipeline(big)
    engine.generate(big)  # warm: kernels, workspaces
    plain = _peak_bytes(pipe, size=1024, tiled=False)
    low = _peak_bytes(pipe, size=1024, tiled=True)
    assert low < plain * 0.7, (low, plain)  # otherwise this test proves nothing

    tiled: list[bool] = []

    def on_step(step: int, total: int) -> None:
        if step >= 1:
            tiled.append(pipe.vae.use_tiling)

    hog = _hog(leave=(plain + low) // 2)
    try:
        result = engine.generate(big, on_step=on_step)
    finally:
        del hog
    assert (result.width, result.height) == (1024, 1024)
    assert tiled[0] is False and tiled[-1] is True  # a first attempt, then the tiled retry
    engine.cache.clear()


def test_a_real_oom_fails_the_job_and_the_engine_recovers(model_dir):
    engine = gpu_engine(model_dir)  # its memory baseline: what earlier tests left allocated
    engine.generate(job())  # models loaded, kernels warm
    hog = _hog(leave=8 * MiB)
    try:
        with pytest.raises(JobError) as err:
            engine.generate(job(params=params(width=1024, height=1024)))
    finally:
        del hog
    code = err.value.code
    del err  # its traceback holds the failed run's frames
    assert code == "out_of_memory"
    assert engine.leaked_bytes() < 64 * MiB  # nothing of the failed run is left behind
    assert pixels(engine.generate(job()).png).shape == (128, 128, 3)
    engine.cache.clear()


def test_leaked_bytes_sees_memory_a_job_left_behind(model_dir):
    """What the worker checks after each job to decide whether to be replaced."""
    engine = gpu_engine(model_dir)
    engine.generate(job())
    assert engine.leaked_bytes() < 64 * MiB  # models in the cache are not a leak
    kept: list[torch.Tensor] = []

    def leak(step: int, total: int) -> None:
        if step == 1:
            kept.append(torch.empty(300 * MiB, dtype=torch.uint8, device="cuda"))

    engine.generate(job(), on_step=leak)
    assert engine.leaked_bytes() > 256 * MiB  # over the worker's threshold: it will exit
    kept.clear()
    assert engine.leaked_bytes() < 64 * MiB
    engine.cache.clear()
