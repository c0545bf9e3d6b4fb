"""The engine's run versus a bare diffusers call on the same model and params.

    python -m bench.engine [--family sd15|sdxl] [--full] [--size 128] [--steps 4] [--repeats 15]

Reports medians (seconds) of: the engine's whole run (fit, skeleton from a template, pipeline
from the cache, the call, PNG encode) and the bare pipeline call with the same prepared
images; their ratio (goal <= 1.03); what step previews add to a run (goal < 5 %); pose extraction ms
per image for each backend; model load seconds cold vs cached. `--full` uses full-size SD1.5/SDXL configs with random weights (same
compute as the real models) - for a GPU; on a CPU keep --size and --steps small.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stack import astronaut_png, fitted_astronaut

STANDING = [
    (0.5, 0.15),
    (0.5, 0.25),
    (0.4, 0.26),
    (0.37, 0.4),
    (0.36, 0.53),
    (0.6, 0.26),
    (0.63, 0.4),
    (0.64, 0.53),
    (0.44, 0.55),
    (0.44, 0.72),
    (0.44, 0.9),
    (0.56, 0.55),
    (0.56, 0.72),
    (0.56, 0.9),
    (0.48, 0.13),
    (0.52, 0.13),
    (0.46, 0.14),
    (0.54, 0.14),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
    parser.add_argument("--full", action="store_true", help="full-size random-weight configs")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "max-autotune-no-cudagraphs"],
    )
    parser.add_argument("--model-dir", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from posegen.images import fit
    from posegen.skeleton import draw_skeleton
    from worker.engine.engine import Engine, EngineConfig, EngineJob
    from worker.engine.run import RunParams, run_pipeline
    from worker.engine.tiny import build_tiny

    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="posegen-bench-"))
    if args.full:
        from bench.full_models import build_full

        base, controlnet = build_full(args.family, model_dir)
    else:
        build_tiny(model_dir)
        base, controlnet = f"tiny-{args.family}", f"tiny-{args.family}-controlnet"

    config = EngineConfig(
        model_dir=model_dir,
        device=args.device,
        dtype=args.dtype,
        pose_backend="mediapipe",
        compile=args.compile,
        compile_mode=args.compile_mode,
    )
    params = RunParams(
        prompt="a portrait avatar of a person",
        negative_prompt="blurry",
        num_inference_steps=args.steps,
        guidance_scale=7.5,
        controlnet_conditioning_scale=1.0,
        strength=1.0,
        seed=0,
        width=args.size,
        height=args.size,
    )
    # What the API stores for this model: the upload re-encoded and fitted to its resolution.
    photo = fitted_astronaut(args.size, args.size)
    job = EngineJob(
        model_key="bench",
        family=args.family,
        base_model=base,
        controlnet_model=controlnet,
        params=params,
        image=photo,
        pose_keypoints=STANDING,
    )

    # Model load: cold (from disk, a fresh engine) versus cached (the same engine again).
    started = time.perf_counter()
    engine = Engine(config)
    pipe = engine.pipeline(job)
    cold = time.perf_counter() - started
    cached_times = []
    for _ in range(5):
        started = time.perf_counter()
        engine.pipeline(job)
        cached_times.append(time.perf_counter() - started)

    from PIL import Image

    subject = fit(Image.open(io.BytesIO(photo)), width=args.size, height=args.size)
    control = draw_skeleton(STANDING, width=args.size, height=args.size)
    micro = args.family == "sdxl"

    def sync() -> None:
        if engine.device.startswith("cuda"):
            torch.cuda.synchronize()

    def bare_call(**kwargs: Any) -> Any:
        """The bare diffusers call on the prepared images."""
        return run_pipeline(
            pipe, init_image=subject, control_image=control, params=params,
            micro_conditioning=micro, **kwargs,
        )  # fmt: skip

    for _ in range(2):  # warm-up (allocator, kernels, compile)
        engine.generate(job)
    sync()
    engine_times, bare_times = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        started = time.perf_counter()
        engine.generate(job)
        sync()
        engine_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        bare_call()
        sync()
        bare_times.append(time.perf_counter() - started)

    # What step previews cost a job (`preview=true`): the projection of the latents on the
    # job's thread at the first step and then every POSEGEN_PREVIEW_INTERVAL seconds (the
    # worker encodes and stores them on a thread of its own), and at every step (the most
    # they can cost). Interleaved with runs without previews.
    preview_times: dict[str, list[float]] = {"none": [], "default": [], "every_step": []}
    previews_made = {"default": 0, "every_step": 0}

    def counted(mode: str) -> Any:
        def on_preview(step: int, image: Any) -> None:
            previews_made[mode] += 1

        return on_preview

    for _ in range(args.repeats):
        for mode, interval in (("none", None), ("default", 1.0), ("every_step", 0.0)):
            started = time.perf_counter()
            if interval is None:
                engine.generate(job)
            else:
                engine.generate(job, on_preview=counted(mode), preview_interval=interval)
            sync()
            preview_times[mode].append(time.perf_counter() - started)
    preview_medians = {k: statistics.median(v) for k, v in preview_times.items()}
    # The projection alone, timed directly (the runs above include the machine's noise).
    from worker.engine.preview import latents_to_image

    latents = torch.randn((1, 4, args.size // 8, args.size // 8), device=engine.device)
    projections = []
    for _ in range(50):
        started = time.perf_counter()
        latents_to_image(latents, args.family)
        projections.append(time.perf_counter() - started)
    projection_s = statistics.median(projections)
    preview_cost = {
        "run_s_median": {k: round(v, 5) for k, v in preview_medians.items()},
        "ratio_default_over_none": round(preview_medians["default"] / preview_medians["none"], 4),
        "ratio_every_step_over_none": round(
            preview_medians["every_step"] / preview_medians["none"], 4
        ),
        "previews_per_run": {k: v / args.repeats for k, v in previews_made.items()},
        "projection_ms_median": round(projection_s * 1000, 3),
        # What the projections of the default cadence take of a run without previews.
        "projection_share_of_run_default": round(
            projection_s * previews_made["default"] / args.repeats / preview_medians["none"], 5
        ),
    }

    # Where the engine's own time goes, phase by phase (medians, ms).
    from posegen.images import as_png
    from worker.engine.engine import _open

    phase_times: dict[str, list[float]] = {}
    for _ in range(3):
        marks = [time.perf_counter()]
        fitted = fit(_open(job.image), width=args.size, height=args.size)
        marks.append(time.perf_counter())
        drawn = engine.control_image(job, fitted)
        marks.append(time.perf_counter())
        looked_up = engine.pipeline(job)
        marks.append(time.perf_counter())
        image = run_pipeline(
            looked_up, init_image=fitted, control_image=drawn, params=params,
            micro_conditioning=micro,
        )  # fmt: skip
        sync()
        marks.append(time.perf_counter())
        as_png(image)
        marks.append(time.perf_counter())
        for name, a, b in zip(
            ("decode_fit", "skeleton", "pipeline_lookup", "diffusers_call", "png_encode"),
            marks, marks[1:], strict=False,
        ):  # fmt: skip
            phase_times.setdefault(name, []).append((b - a) * 1000)
    phases_ms = {k: round(statistics.median(v), 2) for k, v in phase_times.items()}

    # The denoising loop alone, as diffusers' progress bar (and its published it/s) count it:
    # time between the first and the last step's end, synchronised at each step.
    loop_rates = []
    for _ in range(3):
        marks: list[float] = []

        def mark(step: int, total: int, marks: list[float] = marks) -> None:
            sync()
            marks.append(time.perf_counter())

        bare_call(on_step=mark)
        if len(marks) > 1:
            loop_rates.append((len(marks) - 1) / (marks[-1] - marks[0]))

    # Peak GPU memory of one call above the loaded models, per memory-saving mode: what the
    # engine's out-of-memory retry can count on.
    peak_gib: dict[str, float] = {}
    if engine.device.startswith("cuda"):
        modes = {
            "plain": (False, False),
            "attention_slicing": (True, False),
            "vae_tiling": (False, True),
            "both": (True, True),
        }
        for mode, (slicing, tiling) in modes.items():
            if slicing:
                pipe.enable_attention_slicing()
            if tiling:
                pipe.vae.enable_tiling()
            engine.free_memory()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            bare_call()
            torch.cuda.synchronize()
            peak_gib[mode] = round((torch.cuda.max_memory_allocated() - start) / 1024**3, 3)
            pipe.disable_attention_slicing()
            pipe.vae.disable_tiling()

    pose_ms: dict[str, Any] = {}
    from worker.engine.pose import NoPoseDetected, make_extractor
    from worker.engine.pose.openpose import openpose_weights_dir

    pose_photo = fit(Image.open(io.BytesIO(astronaut_png())), width=512, height=512)
    for backend in ("mediapipe", "openpose"):
        if backend == "openpose" and openpose_weights_dir(model_dir) is None:
            # Random weights, same network: the timing holds, the keypoints do not.
            from bench.full_models import write_random_annotators

            write_random_annotators(model_dir)
            pose_ms["openpose_weights"] = "random (real weights absent)"
        extractor = make_extractor(backend, model_dir=model_dir, device=engine.device)
        times = []
        for _ in range(6):
            started = time.perf_counter()
            # Random OpenPose weights find nobody; the work was done all the same.
            with contextlib.suppress(NoPoseDetected):
                extractor.extract(pose_photo)
            times.append(time.perf_counter() - started)
        times = times[1:]  # the first call warms up
        pose_ms[backend] = round(statistics.median(times) * 1000, 2)

    engine_median, bare_median = statistics.median(engine_times), statistics.median(bare_times)
    steps_run = max(1, int(args.steps * params.strength))
    result = {
        "benchmark": "engine",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": engine.device,
            "gpu": torch.cuda.get_device_name() if engine.device.startswith("cuda") else None,
        },
        "model": {
            "family": args.family,
            "full_size": args.full,
            "size": args.size,
            "steps": args.steps,
            "dtype": str(engine.dtype),
            "compile": args.compile and args.compile_mode,
        },
        "repeats": args.repeats,
        "engine_run_s_median": round(engine_median, 5),
        "bare_pipeline_s_median": round(bare_median, 5),
        "ratio_engine_over_bare": round(engine_median / bare_median, 4),
        "bare_it_per_s": round(steps_run / bare_median, 2),
        "engine_phases_ms_median": phases_ms,
        "denoising_loop_it_per_s": round(statistics.median(loop_rates), 2) if loop_rates else None,
        "models_gib": round(engine.cache.used_bytes / 1024**3, 3),
        "gpu_run_peak_gib_by_mode": peak_gib or None,
        "pose_extraction_ms_median": pose_ms,
        "preview_cost": preview_cost,
        "model_load_s": {
            "cold": round(cold, 3),
            "cached_median": round(statistics.median(cached_times), 6),
        },
    }
    print(json.dumps(result, indent=2))
    print(
        f"engine {engine_median * 1000:.1f} ms vs bare {bare_median * 1000:.1f} ms"
        f" -> ratio {result['ratio_engine_over_bare']}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
