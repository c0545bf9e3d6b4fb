"""Pose fidelity: generate with each pose template, extract the pose from the output with the
same extractor, and score PCK@0.1 against the template.

    python -m bench.fidelity [--model-key tiny-sd15-openpose] [--model-dir DIR] [--steps 20]

PCK@0.1: the share of the template's keypoints that the extractor finds within 10 % of the
body size (the larger side of the template's keypoint box). A missing keypoint is a miss; an
output with no person scores 0. On the tiny random models the outputs are noise, so the
figure is at chance - that says the harness works end to end, not that the pose is lost.
The chance level printed beside it is the score of uniformly random keypoints.

Two positive controls, so that a 0 is the model's and not the harness's: each template scored
against itself must be 1.0 (the scorer; the bench stops if one is not), and the extractor's
keypoints of the real photo fitted to the model's size are scored against its keypoints of
the photo at full size (`controls.photo`: the extractor finds a person at that size, and the
same one).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.stack import fitted_astronaut
from posegen.seeding import SEEDS_DIR

Point = tuple[float, float] | None


def body_size(points: list[Point]) -> float:
    xs = [p[0] for p in points if p]
    ys = [p[1] for p in points if p]
    return max(max(xs) - min(xs), max(ys) - min(ys))


def pck(template: list[Point], found: list[Point] | None, *, alpha: float = 0.1) -> float:
    visible = [(i, p) for i, p in enumerate(template) if p]
    if not found:
        return 0.0
    radius = alpha * body_size(template)
    hits = sum(
        1
        for i, p in visible
        if found[i] and math.dist(p, found[i]) <= radius  # type: ignore[arg-type]
    )
    return hits / len(visible)


def chance(template: list[Point], trials: int = 2000) -> float:
    rng = random.Random(0)
    scores = [
        pck(template, [(rng.random(), rng.random()) for _ in range(18)]) for _ in range(trials)
    ]
    return statistics.mean(scores)


def self_control(template: list[Point]) -> float:
    """The scorer's positive control: a template against itself."""
    score = pck(template, template)
    if score != 1.0:
        raise RuntimeError(f"a template against itself scored {score}, not 1.0")
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-key", default="tiny-sd15-openpose")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--pose-backend", default="mediapipe")
    args = parser.parse_args()

    from PIL import Image

    from worker.engine.engine import Engine, EngineConfig, EngineJob
    from worker.engine.pose import NoPoseDetected
    from worker.engine.run import RunParams
    from worker.engine.tiny import build_tiny

    model = next(
        m
        for m in yaml.safe_load((SEEDS_DIR / "ai_models.yaml").read_text())
        if m["model_key"] == args.model_key
    )
    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="posegen-fidelity-"))
    if model["base_model"].startswith("tiny-"):
        build_tiny(model_dir)
    width, height = (int(v) for v in model["resolution"].split("x"))
    photo = fitted_astronaut(width, height)
    engine = Engine(EngineConfig(model_dir=model_dir, pose_backend=args.pose_backend))
    extractor = engine.extractor

    def extract(image: Image.Image) -> list[Point] | None:
        try:
            return extractor.extract(image)
        except NoPoseDetected:
            return None

    from bench.stack import astronaut_png

    full = extract(Image.open(io.BytesIO(astronaut_png())).convert("RGB"))
    fitted = extract(Image.open(io.BytesIO(photo)).convert("RGB"))
    photo_control = {
        "person_found_full": full is not None,
        "person_found_fitted": fitted is not None,
        "pck@0.1_fitted_vs_full": round(pck(full, fitted), 3) if full else None,
    }
    results: dict[str, Any] = {}
    for path in sorted((SEEDS_DIR / "pose_templates").glob("*.json")):
        template = [tuple(p) if p else None for p in json.loads(path.read_text())["keypoints"]]
        params = RunParams(
            prompt=model["default_prompt"],
            negative_prompt=model["negative_prompt"],
            num_inference_steps=args.steps or model["default_steps"],
            guidance_scale=model["guidance_scale"],
            controlnet_conditioning_scale=1.0,
            strength=1.0,
            seed=0,
            width=width,
            height=height,
        )
        job = EngineJob(
            model_key=args.model_key,
            family=model["family"],
            base_model=model["base_model"],
            controlnet_model=model["controlnet_model"],
            params=params,
            image=photo,
            pose_keypoints=template,
        )
        output = Image.open(io.BytesIO(engine.generate(job).png))
        found = extract(output)
        results[path.stem] = {
            "pck@0.1": round(pck(template, found), 3),  # type: ignore[arg-type]
            "self": self_control(template),
            "person_found": found is not None,
            "chance": round(chance(template), 3),  # type: ignore[arg-type]
        }
    scores = [r["pck@0.1"] for r in results.values()]
    summary = {
        "benchmark": "fidelity",
        "date": time.strftime("%Y-%m-%d"),
        "model_key": args.model_key,
        "pose_backend": engine.extractor.name,
        "templates": results,
        "mean_pck@0.1": round(statistics.mean(scores), 3),
        "mean_chance": round(statistics.mean(r["chance"] for r in results.values()), 3),
        "controls": {
            "template_vs_itself": min(r["self"] for r in results.values()),
            "photo": photo_control,
        },
    }
    print(json.dumps(summary, indent=2))
    print(
        f"mean PCK@0.1 {summary['mean_pck@0.1']} (chance {summary['mean_chance']});"
        f" controls {summary['controls']}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
