"""Idempotent upserts of the model catalog and the pose templates from seeds/."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import LOCAL, PROVIDERS, TIERS, AiModel, PoseTemplate
from db.types import utcnow
from posegen.catalog import validate_keypoints

SEEDS_DIR = Path(__file__).resolve().parent.parent / "seeds"
MODEL_FIELDS = (
    "name", "provider", "author", "family", "base_model", "controlnet_model", "tier", "credit_cost",
    "resolution", "quality", "priority", "default_steps", "guidance_scale", "default_prompt",
    "negative_prompt", "processing_time", "enabled", "coming_soon",
)  # fmt: skip
# Fields an entry may leave out (null): a hosted model's id at its provider, and the hosted
# model a local one falls back to.
OPTIONAL_MODEL_FIELDS = ("remote_model", "fallback_model_key")


@dataclass
class SeedReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"created {len(self.created)}, updated {len(self.updated)}, "
            f"unchanged {len(self.unchanged)}"
        )


def _check_model_entry(entry: dict[str, Any]) -> dict[str, Any]:
    missing = [f for f in ("model_key", *MODEL_FIELDS) if f not in entry]
    if missing:
        raise ValueError(f"model {entry.get('model_key')!r} lacks {', '.join(missing)}")
    if entry["tier"] not in TIERS:
        raise ValueError(f"model {entry['model_key']!r}: unknown tier {entry['tier']!r}")
    w, _, h = str(entry["resolution"]).lower().partition("x")
    if not (w.isdigit() and h.isdigit() and int(w) % 8 == 0 and int(h) % 8 == 0):
        raise ValueError(f"model {entry['model_key']!r}: resolution must be WxH, multiples of 8")
    if not 0 <= int(entry["priority"]) <= 9:
        raise ValueError(f"model {entry['model_key']!r}: priority must be 0..9")
    _check_provider(entry)
    return {
        **{f: entry[f] for f in ("model_key", *MODEL_FIELDS)},
        **{f: entry.get(f) for f in OPTIONAL_MODEL_FIELDS},
    }


def _check_provider(entry: dict[str, Any]) -> None:
    key, provider = entry["model_key"], entry["provider"]
    if provider not in PROVIDERS:
        raise ValueError(f"model {key!r}: provider must be one of {', '.join(PROVIDERS)}")
    if provider != LOCAL and not entry.get("remote_model"):
        raise ValueError(f"model {key!r}: a hosted model needs remote_model")
    if provider != LOCAL and entry.get("fallback_model_key"):
        raise ValueError(f"model {key!r}: only a local model falls back to a hosted one")


def _check_fallbacks(entries: list[dict[str, Any]]) -> None:
    """Each fallback names a hosted model of the same file, of the same size (a job's
    parameters were resolved for its model's size) and tier, that runs (not coming soon).
    Routing checks it again (`posegen.routing.fallback_of`): the table may change after."""
    by_key = {entry["model_key"]: entry for entry in entries}
    for entry in entries:
        target = by_key.get(entry.get("fallback_model_key") or "")
        if not entry.get("fallback_model_key"):
            continue
        if target is None or target["provider"] == LOCAL:
            raise ValueError(
                f"model {entry['model_key']!r}: fallback_model_key must name a hosted model"
            )
        if (target["resolution"], target["tier"]) != (entry["resolution"], entry["tier"]):
            raise ValueError(
                f"model {entry['model_key']!r}: its fallback must have its resolution and tier"
            )
        if target["coming_soon"]:
            raise ValueError(f"model {entry['model_key']!r}: its fallback is coming soon")


def seed_models(session: Session, path: Path | None = None) -> SeedReport:
    entries = [
        _check_model_entry(raw)
        for raw in yaml.safe_load((path or SEEDS_DIR / "ai_models.yaml").read_text())
    ]
    _check_fallbacks(entries)
    report = SeedReport()
    for entry in entries:
        key = entry.pop("model_key")
        _upsert(session, AiModel, "model_key", key, entry, report)
    session.flush()
    return report


def seed_poses(session: Session, directory: Path | None = None) -> SeedReport:
    report = SeedReport()
    for path in sorted((directory or SEEDS_DIR / "pose_templates").glob("*.json")):
        data = json.loads(path.read_text())
        key = str(data.get("key") or path.stem)
        fields = {
            "name": str(data.get("name", key)),
            "description": str(data.get("description", "")),
            "keypoints": validate_keypoints(data.get("keypoints")),
        }
        _upsert(session, PoseTemplate, "key", key, fields, report)
    session.flush()
    return report


def _upsert(
    session: Session,
    table: type[AiModel] | type[PoseTemplate],
    key_column: str,
    key: str,
    fields: dict[str, Any],
    report: SeedReport,
) -> None:
    existing = cast(
        "AiModel | PoseTemplate | None",
        session.scalar(select(table).where(getattr(table, key_column) == key)),
    )
    if existing is None:
        session.add(table(**{key_column: key}, **fields))
        report.created.append(key)
    elif _apply(existing, fields):
        existing.updated_at = utcnow()
        report.updated.append(key)
    else:
        report.unchanged.append(key)


def _apply(row: object, fields: dict[str, Any]) -> bool:
    changed = False
    for name, value in fields.items():
        if getattr(row, name) != value:
            setattr(row, name, value)
            changed = True
    return changed
