"""The engine on the tiny models (CPU, 2-4 steps): families, pose, determinism, the cache."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from posegen.errors import JobError
from posegen.images import fit
from posegen.seeding import SEEDS_DIR
from posegen.skeleton import COLORS, draw_skeleton
from tests.factories import astronaut_png, png_bytes
from worker.engine import families
from worker.engine.engine import Engine, EngineConfig, EngineJob
from worker.engine.pose import NoPoseDetected
from worker.engine.pose.mediapipe import MediaPipeExtractor
from worker.engine.pose.openpose import OpenPoseExtractor
from worker.engine.resolve import WeightsMissing, resolve
from worker.engine.run import RunParams

STANDING = [
    (0.5, 0.15), (0.5, 0.25), (0.4, 0.26), (0.37, 0.4), (0.36, 0.53), (0.6, 0.26), (0.63, 0.4),
    (0.64, 0.53), (0.44, 0.55), (0.44, 0.72), (0.44, 0.9), (0.56, 0.55), (0.56, 0.72),
    (0.56, 0.9), (0.48, 0.13), (0.52, 0.13), (0.46, 0.14), (0.54, 0.14),
]  # fmt: skip


def params(**overrides: object) -> RunParams:
    base = dict(prompt="a person", negative_prompt="blurry", num_inference_steps=2, guidance_scale=7.5, controlnet_conditioning_scale=1.0, strength=1.0, seed=3, width=128, height=128)  # fmt: skip
    base.update(overrides)
    return RunParams(**base)  # type: ignore[arg-type]


def job(family: str = "sd15", **overrides: object) -> EngineJob:
    fields = dict(model_key=f"tiny-{family}-openpose", family=family, base_model=f"tiny-{family}", controlnet_model=f"tiny-{family}-controlnet", params=params(), image=astronaut_png(), pose_keypoints=STANDING)  # fmt: skip
    fields.update(overrides)
    return EngineJob(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    return Engine(EngineConfig(model_dir=model_dir, pose_backend="mediapipe"))


def test_every_enabled_seeded_family_has_pipelines():
    seeded = yaml.safe_load((SEEDS_DIR / "ai_models.yaml").read_text())
    for model in seeded:
        if model["enabled"]:
            family = families.family(model["family"])
            assert families.pipeline_class(family.base) and families.pipeline_class(family.controlnet)  # fmt: skip
        else:  # a family without pipelines may only appear disabled
            assert model["coming_soon"] or model["family"] in families.FAMILIES


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_both_families_render_at_the_model_resolution(engine, family):
    steps: list[tuple[int, int]] = []
    result = engine.generate(job(family, params=params(num_inference_steps=3)), on_step=lambda s, t: steps.append((s, t)))  # fmt: skip
    image = Image.open(io.BytesIO(result.png))
    assert image.format == "PNG" and image.size == (128, 128)
    assert steps[0] == (0, 3) and steps[-1] == (3, 3)


def test_same_seed_same_pixels_other_seed_other_pixels(engine):
    a = engine.generate(job()).png
    b = engine.generate(job()).png
    c = engine.generate(job(params=params(seed=4))).png
    assert a == b and a != c


def test_cancel_between_steps(engine):
    from worker.engine.engine import Canceled

    calls: list[int] = []
    with pytest.raises(Canceled):
        engine.generate(job(params=params(num_inference_steps=10)), on_step=lambda s, t: calls.append(s), should_cancel=lambda: len(calls) >= 3)  # fmt: skip
    assert max(calls) < 10


def test_tiny_strength_still_runs_one_step(engine):
    steps: list[int] = []
    engine.generate(job(params=params(num_inference_steps=4, strength=0.1)), on_step=lambda s, t: steps.append(t))  # fmt: skip
    assert steps[-1] == 1


def test_missing_weights_name_the_pull_command(tmp_path):
    with pytest.raises(WeightsMissing) as err:
        resolve("some-org/not-downloaded", model_dir=tmp_path, model_key="sd15-openpose")
    assert err.value.code == "model_weights_missing"
    assert "posegen models pull sd15-openpose" in err.value.message


def test_single_file_checkpoints_resolve(tmp_path):
    (tmp_path / "my-controlnet.safetensors").write_bytes(b"")
    assert resolve("my-controlnet", model_dir=tmp_path, model_key="k").kind == "single_file"


def test_fit_crops_instead_of_stretching():
    wide = Image.new("RGB", (400, 100), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 100, 100))  # a blue band on the left edge gets cropped off
    fitted = fit(wide, width=128, height=128)
    assert fitted.size == (128, 128)
    assert np.asarray(fitted)[64, 0].tolist() == [255, 0, 0]


def test_skeleton_uses_openpose_colours():
    image = np.asarray(draw_skeleton(STANDING, width=512, height=512))
    nose = STANDING[0]
    assert image[int(nose[1] * 512), int(nose[0] * 512)].tolist() == list(COLORS[0])
    assert image[0, 0].tolist() == [0, 0, 0]


def test_mediapipe_finds_the_astronaut():
    extractor = MediaPipeExtractor()
    photo = fit(Image.open(io.BytesIO(astronaut_png())), width=512, height=512)
    keypoints = extractor.extract(photo)
    nose, neck, r_sh, l_sh = keypoints[0], keypoints[1], keypoints[2], keypoints[5]
    assert nose and neck and r_sh and l_sh
    # The face is in the upper half, between the shoulders; the neck sits below the nose.
    assert nose[1] < 0.5 and r_sh[0] < nose[0] < l_sh[0] and neck[1] > nose[1]
    with pytest.raises(NoPoseDetected):
        extractor.extract(Image.open(io.BytesIO(png_bytes((256, 256)))))


def test_no_person_is_a_job_error(engine):
    with pytest.raises(JobError) as err:
        engine.generate(job(pose_keypoints=None, image=png_bytes((128, 128))))
    assert err.value.code == "no_pose_detected"


def test_openpose_loads_weights_from_the_model_dir(tmp_path):
    """Locally built files with the lllyasviel/Annotators layout load through controlnet-aux."""
    from bench.full_models import write_random_annotators

    write_random_annotators(tmp_path)
    extractor = OpenPoseExtractor.load(model_dir=tmp_path)
    assert extractor.name == "openpose"
    # Random weights find nobody: the contract's error, not a crash.
    with pytest.raises(NoPoseDetected):
        extractor.extract(Image.open(io.BytesIO(png_bytes((64, 64)))))


def test_cache_two_models_alternating_load_once_each(model_dir):
    engine = Engine(EngineConfig(model_dir=model_dir, pose_backend="mediapipe", cache_bytes=1024**3))  # fmt: skip
    for _ in range(3):
        engine.pipeline(job("sd15"))
        engine.pipeline(job("sdxl"))
    assert set(engine.cache.stats.loads.values()) == {1} and len(engine.cache.stats.loads) == 4
    assert engine.cache.stats.evictions == 0


def test_cache_evicts_least_recently_used_over_budget(model_dir):
    small = Engine(EngineConfig(model_dir=model_dir, pose_backend="mediapipe", cache_bytes=1))
    small.pipeline(job("sd15"))
    small.pipeline(job("sdxl"))
    assert not any(k.endswith("tiny-sd15") for k in small.cache.keys())
    small.pipeline(job("sd15"))
    assert small.cache.stats.loads["base:sd15:tiny-sd15"] == 2 and small.cache.stats.evictions >= 2


def test_two_controlnets_share_one_base(model_dir, tmp_path):
    engine = Engine(EngineConfig(model_dir=model_dir, pose_backend="mediapipe"))
    a = engine.pipeline(job("sd15"))
    twin = job("sd15", controlnet_model=str(model_dir / "tiny-sd15-controlnet"))  # another ref
    b = engine.pipeline(twin)
    assert a is not b and a.unet is b.unet and a.controlnet is not b.controlnet
    assert engine.cache.stats.loads["base:sd15:tiny-sd15"] == 1


def test_tiny_models_build_deterministically(tmp_path):
    import hashlib

    from worker.engine.tiny import build_tiny

    def digest(folder: Path) -> str:
        files = sorted(folder.rglob("*.safetensors"))
        assert len(files) >= 8  # unet, vae, text encoder(s), controlnet, for both families
        return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()

    build_tiny(tmp_path / "a")
    build_tiny(tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_out_of_memory_retries_once_with_less_memory_then_fails(model_dir):
    """A CUDA OOM raised between steps: the engine releases the other cached models, retries
    with VAE tiling (attention stays SDPA: slicing it saves no memory), and reports
    `out_of_memory` if the retry runs out too."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    engine = Engine(EngineConfig(model_dir=model_dir, pose_backend="mediapipe"))
    engine.pipeline(job("sdxl"))  # another model in the cache
    pipe = engine.pipeline(job())
    assert len(engine.cache.keys()) == 4
    calls = {"n": 0}
    tiled: list[bool] = []

    def oom_once(step: int, total: int) -> None:
        if step >= 1:
            tiled.append(pipe.vae.use_tiling)
        if step == 1 and calls["n"] == 0:
            calls["n"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (raised by the test)")

    result = engine.generate(job(), on_step=oom_once)
    assert calls["n"] == 1 and Image.open(io.BytesIO(result.png)).size == (128, 128)
    assert tiled[0] is False and tiled[-1] is True  # the retry ran tiled
    assert sorted(engine.cache.keys()) == sorted(engine.cache_keys(job()))  # sdxl released
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert engine.generate(job()).png  # the next job runs untiled again
    assert pipe.vae.use_tiling is False

    def oom_always(step: int, total: int) -> None:
        if step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (raised by the test)")

    with pytest.raises(JobError) as err:
        engine.generate(job(), on_step=oom_always)
    assert err.value.code == "out_of_memory"


def test_pipelines_keep_the_configured_dtype(model_dir):
    """from_pipe casts to float32 unless told the dtype: the composed pipeline must keep it."""
    import torch

    engine = Engine(EngineConfig(model_dir=model_dir, pose_backend="mediapipe", dtype="bf16"))
    for family in ("sd15", "sdxl"):
        pipe = engine.pipeline(job(family))
        modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
        assert modules and all(m.dtype == torch.bfloat16 for m in modules), family


def test_composing_a_pipeline_logs_no_empty_float32_warning(model_dir):
    """diffusers warns of modules "kept in float32: []" on every from_pipe: the engine drops
    that empty-list line, and only that one."""
    import logging

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("diffusers.models.modeling_utils")
    handler = Keep(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        engine = Engine(EngineConfig(model_dir=model_dir, pose_backend="mediapipe"))
        engine.pipeline(job("sd15"))
        assert not [r for r in records if "float32" in r.getMessage()]
        logger.warning("There are modules in X that should be kept in float32: ['norm'].")
        assert [r.getMessage() for r in records] == [
            "There are modules in X that should be kept in float32: ['norm']."
        ]
    finally:
        logger.removeHandler(handler)


def test_device_choice_per_process():
    import torch

    from worker.engine.engine import _pick_device

    assert _pick_device("cpu", 3) == "cpu"
    assert _pick_device("auto", 0) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert _pick_device("cuda:1", 5) == "cuda:1"  # an explicit device is kept


def test_torch_threads_setting_sets_the_operator_threads(model_dir):
    import torch

    before = torch.get_num_threads()
    try:
        Engine(EngineConfig(model_dir=model_dir, pose_backend="mediapipe", torch_threads=1))
        assert torch.get_num_threads() == 1
        Engine(EngineConfig(model_dir=model_dir, pose_backend="mediapipe"))  # 0: left alone
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_skeleton_matches_opencvs_drawing():
    """The Pillow drawing (which the API can do without OpenCV) against OpenCV's, as
    controlnet-aux draws: the same polygons; a fill may differ on an edge pixel."""
    import math

    import cv2

    from posegen.skeleton import LIMBS

    size = 512
    reference = np.zeros((size, size, 3), dtype=np.uint8)
    for (a, b), color in zip(LIMBS, COLORS, strict=False):
        p1, p2 = STANDING[a - 1], STANDING[b - 1]
        if p1 is None or p2 is None:
            continue
        x1, y1, x2, y2 = p1[0] * size, p1[1] * size, p2[0] * size, p2[1] * size
        angle = math.degrees(math.atan2(y1 - y2, x1 - x2))
        length = math.hypot(x1 - x2, y1 - y2)
        polygon = cv2.ellipse2Poly(
            (int((x1 + x2) / 2), int((y1 + y2) / 2)), (int(length / 2), 4), int(angle), 0, 360, 1
        )
        cv2.fillConvexPoly(reference, np.asarray(polygon), [int(c * 0.6) for c in color])
    for point, color in zip(STANDING, COLORS, strict=False):
        if point is not None:
            cv2.circle(reference, (int(point[0] * size), int(point[1] * size)), 4, color, -1)
    drawn = np.asarray(draw_skeleton(STANDING, width=size, height=size))
    differing = np.any(drawn != reference, axis=2)
    painted = np.any(reference != 0, axis=2)
    assert differing.sum() <= 0.05 * painted.sum(), (differing.sum(), painted.sum())


@pytest.mark.parametrize(
    ("family", "zero", "first_channel"),
    [("sd15", (127, 127, 127), (172, 156, 168)), ("sdxl", (141, 125, 127), (187, 179, 182))],
)
def test_latent_preview_is_the_known_linear_projection(family, zero, first_channel):
    import torch

    from worker.engine.preview import latents_to_image

    latents = torch.zeros((1, 4, 8, 6))
    latents[0, 0, :, 3:] = 1.0  # the right half: channel 0 alone
    image = latents_to_image(latents, family)
    assert image.size == (6, 8) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == zero and image.getpixel((5, 7)) == first_channel


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_previews_at_the_first_step_then_by_interval(engine, family):
    seen: list[tuple[int, tuple[int, int]]] = []
    run = job(family, params=params(num_inference_steps=4))
    keep = lambda step, image: seen.append((step, image.size))  # noqa: E731
    engine.generate(run, on_preview=keep, preview_interval=3600)
    assert seen == [(1, (16, 16))]  # 128 px: 16 x 16 latents
    seen.clear()
    engine.generate(run, on_preview=keep, preview_interval=0)
    assert seen == [(step, (16, 16)) for step in (1, 2, 3, 4)]
