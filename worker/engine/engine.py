"""The engine's one entry point: a job description in, PNG bytes out.

Composition root of the engine: it owns the device, the pipeline cache and the pose
extractor, and calls the small modules in order. Constructed lazily inside the worker's
child process, so CUDA is never initialised in a Celery parent before it forks.
"""

from __future__ import annotations

import gc
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from posegen.errors import JobError
from posegen.images import fit
from posegen.skeleton import Keypoints, draw_skeleton
from worker.engine import families
from worker.engine.cache import PipelineCache
from worker.engine.device import (
    CompileOptions,
    compile_module,
    configure_dynamo,
    leaves_cpu_time,
)
from worker.engine.device import pick_device as _pick_device
from worker.engine.device import pick_dtype as _pick_dtype
from worker.engine.jobs import EngineJob, EngineResult, Prepared, preview_hook
from worker.engine.pose import NoPoseDetected, PoseExtractor, make_extractor
from worker.engine.resolve import Resolved, resolve
from worker.engine.run import Canceled, Item, run_batch, steps_for

log = logging.getLogger(__name__)


class _NothingKeptInFloat32(logging.Filter):
    """diffusers (0.42) warns on every cast with a dtype, so on every `from_pipe` here, that a
    model has "modules that should be kept in float32: []" and that casting "can lead to
    inconsistent results", even when that list is empty: nothing is kept, and nothing is
    inconsistent. Only that empty-list line is dropped; a real list still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NothingKeptInFloat32())

__all__ = ["Canceled", "Engine", "EngineConfig", "EngineJob", "EngineResult", "Prepared"]


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    device: str = "auto"
    dtype: str = "auto"
    pose_backend: str = "auto"
    cache_bytes: int = 24 * 1024**3
    compile: bool = False
    compile_mode: str = "default"
    # torch.compile's backend: inductor; "eager" or "aot_eager" check the compiled path's
    # wiring without generating kernels (tests on the CPU).
    compile_backend: str = "inductor"
    cpu_offload: bool = False
    # CPU threads for torch's operators (0: torch's default, one per core).
    torch_threads: int = 0
    # This process's slot among the worker's processes: with several GPUs, process i uses
    # GPU i (mod the count) - one process per GPU.
    process_index: int = 0


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (OSError, ValueError) as exc:  # the API re-encoded it; storage returned something else
        raise JobError("invalid_input", "A stored input image could not be decoded.") from exc


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        import torch

        self.config = config
        if config.torch_threads > 0:
            torch.set_num_threads(config.torch_threads)
        self.device = _pick_device(config.device, config.process_index)
        self.dtype = _pick_dtype(config.dtype, self.device)
        if config.compile:
            configure_dynamo()
        self.cache = PipelineCache(budget_bytes=config.cache_bytes)
        self._extractor: PoseExtractor | None = None
        # With POSEGEN_COMPILE, the calls this process has run compiled: (model, images,
        # guidance on) -> the cache entries they ran on (a reloaded model compiles anew).
        self._compiled: dict[tuple[str, int, bool], tuple[str, str]] = {}
        self._torch = torch
        self.memory_baseline = self._gpu_allocated()
        log.info(
            "engine ready",
            extra={
                "device": self.device,
                "dtype": str(self.dtype),
                "torch_threads": torch.get_num_threads(),
            },
        )
        if self.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    @property
    def leaves_cpu_time(self) -> bool:
        return leaves_cpu_time(self.device, self.config.torch_threads)

    # -- pose -----------------------------------------------------------------------------------
    @property
    def extractor(self) -> PoseExtractor:
        if self._extractor is None:
            self._extractor = make_extractor(
                self.config.pose_backend, model_dir=self.config.model_dir, device=self.device
            )
        return self._extractor

    def control_image(self, job: EngineJob, subject: Image.Image) -> Image.Image:
        w, h = job.params.width, job.params.height
        if job.pose_keypoints is not None:
            keypoints: Keypoints = job.pose_keypoints
        else:
            source = fit(_open(job.pose_image), width=w, height=h) if job.pose_image else subject
            try:
                keypoints = self.extractor.extract(source)
            except NoPoseDetected as exc:
                where = "pose_image" if job.pose_image else "image"
                raise JobError(
                    "no_pose_detected", f"No person was found in the {where}: {exc}"
                ) from exc
        return draw_skeleton(keypoints, width=w, height=h)

    # -- models ---------------------------------------------------------------------------------
    def pipeline(self, job: EngineJob) -> Any:
        family = families.family(job.family)
        base_ref, cn_ref = self._refs(job)
        base_key, cn_key = _cache_keys(family.name, base_ref, cn_ref)
        base = self.cache.get(base_key, lambda: self._load_base(family, base_ref), pinned=(cn_key,))
        controlnet = self.cache.get(
            cn_key, lambda: self._load_controlnet(cn_ref), pinned=(base_key,)
        )

        def build() -> Any:
            cls = families.pipeline_class(family.controlnet)
            # from_pipe casts every module to its `dtype` argument, float32 when none is given:
            # without it a half-precision base would run in float32 on the GPU.
            pipe = cls.from_pipe(base, controlnet=controlnet, dtype=self.dtype)
            pipe.set_progress_bar_config(disable=True)
            if self.config.cpu_offload and self.device.startswith("cuda"):
                pipe.enable_model_cpu_offload()
            return pipe

        return self.cache.composed(base_key, cn_key, build)

    def _refs(self, job: EngineJob) -> tuple[Resolved, Resolved]:
        model_dir = self.config.model_dir
        return (
            resolve(job.base_model, model_dir=model_dir, model_key=job.model_key),
            resolve(job.controlnet_model, model_dir=model_dir, model_key=job.model_key),
        )

    def cache_keys(self, job: EngineJob) -> tuple[str, str]:
        """The cache entries a job's pipeline is built from: its base and its ControlNet."""
        return _cache_keys(job.family, *self._refs(job))

    def _load_base(self, family: families.Family, ref: Resolved) -> Any:
        cls = families.pipeline_class(family.base)
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if family.name == "sd15":
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        if ref.kind == "single_file":
            pipe = cls.from_single_file(str(ref.path), **kwargs)
        else:
            pipe = cls.from_pretrained(str(ref.path), **kwargs)
        return self._place(pipe)

    def _load_controlnet(self, ref: Resolved) -> Any:
        from diffusers import ControlNetModel

        if ref.kind == "single_file":
            model = ControlNetModel.from_single_file(str(ref.path), dtype=self.dtype)
        else:
            model = ControlNetModel.from_pretrained(str(ref.path), dtype=self.dtype)
        return self._place(model)

    def _place(self, obj: Any) -> Any:
        """On the device; on CUDA in channels_last, and compiled with POSEGEN_COMPILE (the
        ControlNet, called first in each step, marks the step's start)."""
        if not self.config.cpu_offload:
            obj = obj.to(self.device)
        module = getattr(obj, "unet", obj)
        if self.device.startswith("cuda"):
            module.to(memory_format=self._torch.channels_last)
        if self.config.compile:
            options = CompileOptions(self.config.compile_mode, self.config.compile_backend)
            compile_module(module, options, starts_step=not hasattr(obj, "unet"))
        return obj

    # -- the run --------------------------------------------------------------------------------
    def prepare(
        self, job: EngineJob, *, on_pose: Callable[[Image.Image], None] | None = None
    ) -> Prepared:
        """The job's photo fitted and its skeleton drawn (`on_pose` receives it): what can
        fail for this job alone (an undecodable input, no pose found) fails here, before a
        batch's call."""
        w, h = job.params.width, job.params.height
        subject = fit(_open(job.image), width=w, height=h)
        control = self.control_image(job, subject)
        if on_pose is not None:
            on_pose(control)
        return Prepared(job=job, subject=subject, control=control)

    def generate(
        self,
        job: EngineJob,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        on_pose: Callable[[Image.Image], None] | None = None,
        on_preview: Callable[[int, Image.Image], None] | None = None,
        preview_interval: float = 1.0,
    ) -> EngineResult:
        """One job: `prepare`, then `run`. `on_pose` receives the skeleton the job is
        conditioned on, once it is drawn; `on_preview(step, image)` a preview of the latents
        at the first step, then at most every `preview_interval` seconds."""
        started = time.perf_counter()
        prepared = self.prepare(job, on_pose=on_pose)
        result = self.run(
            [prepared], on_step=on_step, should_cancel=should_cancel, previews=[on_preview],
            preview_interval=preview_interval,
        )[0]  # fmt: skip
        return EngineResult(images=result.images, seconds=time.perf_counter() - started)

    def run(
        self,
        batch: Sequence[Prepared],
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        previews: Sequence[Callable[[int, Image.Image], None] | None] = (),
        preview_interval: float = 1.0,
    ) -> list[EngineResult]:
        """Prepared jobs of one model that share `Params.batch_key`, in one pipeline call:
        each job's images, in the batch's order. `previews[i]` (None: none) receives job i's
        previews (of its first image)."""
        started = time.perf_counter()
        first = batch[0].job
        key = first.params.batch_key(first.params.negative_prompt)
        if any(
            (p.job.model_key, p.job.params.batch_key(p.job.params.negative_prompt))
            != (first.model_key, key)
            for p in batch
        ):
            raise ValueError("A batch's jobs must be of one model and share Params.batch_key.")
        pipe = self.pipeline(first)
        if on_step is not None:
            on_step(0, steps_for(first.params))
        items = [item for prepared in batch for item in prepared.items]
        on_latents = preview_hook(batch, previews, preview_interval)
        images = self._run_with_oom_retry(pipe, first, items, on_step, should_cancel, on_latents)
        if self.config.compile:
            shape = (first.model_key, len(items), first.params.guidance_scale > 1)
            self._compiled[shape] = self.cache_keys(first)
        seconds = time.perf_counter() - started
        results, at = [], 0
        for prepared in batch:
            count = prepared.job.params.num_outputs
            results.append(EngineResult(images=images[at : at + count], seconds=seconds))
            at += count
        return results

    def compiled_for(self, model_key: str, *, images: int, guidance_scale: float) -> bool:
        """Whether a call of this model with `images` images runs on kernels this process
        has compiled (`worker.engine.warmup`); always without POSEGEN_COMPILE. Guidance above
        1 doubles the UNet's batch (classifier-free guidance): another shape."""
        if not self.config.compile:
            return True
        entries = self._compiled.get((model_key, images, guidance_scale > 1))
        return entries is not None and set(entries) <= set(self.cache.keys())

    def _run_with_oom_retry(
        self,
        pipe: Any,
        job: EngineJob,
        items: list[Item],
        on_step: Callable[[int, int], None] | None,
        should_cancel: Callable[[], bool] | None,
        on_latents: Callable[[int, Any], None] | None = None,
    ) -> list[Image.Image]:
        micro = families.family(job.family).micro_conditioning
        large = job.params.width * job.params.height > 1024 * 1024
        for attempt in (1, 2):
            # Tiling is set for each run (a retry turns it on for that run only).
            if large or attempt == 2:
                pipe.vae.enable_tiling()
            else:
                pipe.vae.disable_tiling()
            try:
                if attempt == 2 and len(items) > 1:
                    return self._one_by_one(pipe, job, items, on_step, should_cancel)
                return run_batch(
                    pipe, items, params=job.params, micro_conditioning=micro, on_step=on_step,
                    should_cancel=should_cancel, on_latents=on_latents,
                )  # fmt: skip
            except self._torch.OutOfMemoryError as exc:
                if attempt == 2:
                    raise JobError(
                        "out_of_memory",
                        f"The GPU ran out of memory for a {w_h(job)} image, one at a time, "
                        "even with the other cached models released and VAE tiling; try a "
                        "smaller model or a smaller size.",
                    ) from exc
                log.warning("CUDA out of memory; retrying with less memory")
            # Past the except block the failed attempt's frames, which held its activations,
            # are gone: only now can their memory go back.
            self.lower_memory(pipe, keep=self.cache_keys(job))
        raise AssertionError("unreachable")  # pragma: no cover

    def _one_by_one(
        self,
        pipe: Any,
        job: EngineJob,
        items: list[Item],
        on_step: Callable[[int, int], None] | None,
        should_cancel: Callable[[], bool] | None,
    ) -> list[Image.Image]:
        """The retry of a call of several images that ran out of memory: a call for each
        image (each the image it makes in any call), the progress spread over the calls; no
        previews (a call's latents are one image's, not its batch's)."""
        micro = families.family(job.family).micro_conditioning
        images: list[Image.Image] = []
        for index, item in enumerate(items):

            def step(done: int, total: int, index: int = index) -> None:
                if on_step is not None:
                    on_step((index * total + done) // len(items), total)

            images += run_batch(
                pipe, [item], params=job.params, micro_conditioning=micro, on_step=step,
                should_cancel=should_cancel,
            )  # fmt: skip
        return images

    def lower_memory(self, pipe: Any, *, keep: tuple[str, ...]) -> None:
        """What the out-of-memory retry does before its second attempt: release the other
        models in this process's cache, and slice attention where it is not PyTorch's SDPA.
        SDPA's kernels are memory-efficient already: slicing saves nothing there (measured on
        an H100 by bench.engine's gpu_run_peak_gib_by_mode: the same peak with and without).
        Slicing stays on for the pipeline's later jobs; VAE tiling is per run."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.cache.keep_only(keep)  # and empties the allocator's cache
        if not all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values()):
            pipe.enable_attention_slicing()

    # -- memory ---------------------------------------------------------------------------------
    def _gpu_allocated(self) -> int:
        torch = self._torch
        if self.device.startswith("cuda") and torch.cuda.is_available():
            return int(torch.cuda.memory_allocated())
        return 0

    def free_memory(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

    def leaked_bytes(self) -> int:
        """GPU memory held beyond the cached models after a job (0 on the CPU)."""
        if not self.device.startswith("cuda"):
            return 0
        self.free_memory()
        return max(0, self._gpu_allocated() - self.memory_baseline - self.cache.used_bytes)


def _cache_keys(family: str, base: Resolved, controlnet: Resolved) -> tuple[str, str]:
    return f"base:{family}:{base.ref}", f"controlnet:{controlnet.ref}"


def w_h(job: EngineJob) -> str:
    return f"{job.params.width}x{job.params.height}"
