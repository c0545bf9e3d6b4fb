"""The model catalog and pose templates: lookups for submit, listings for the API."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import bindparam, or_, select
from sqlalchemy.orm import Session

from db.models import LOCAL, AiModel, PoseTemplate
from posegen.errors import InvalidRequest, NotFound

COCO18_NAMES = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder",
    "left_elbow", "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip",
    "left_knee", "left_ankle", "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip


def listed_models(session: Session) -> Sequence[AiModel]:
    """Enabled and coming-soon models, cheapest tier first."""
    stmt = (
        select(AiModel)
        .where(or_(AiModel.enabled.is_(True), AiModel.coming_soon.is_(True)))
        .order_by(AiModel.credit_cost, AiModel.model_key)
    )
    return session.scalars(stmt).all()


def served_models(session: Session, keys: Sequence[str] = ()) -> dict[str, str]:
    """The local models a GPU worker serves, key -> id: those named (`posegen worker
    --models`), else every local model in the catalog (a model disabled while jobs of it wait
    still runs them). Hosted models are the remote worker's (`hosted_models`)."""
    stmt = select(AiModel.model_key, AiModel.id).where(AiModel.provider == LOCAL)
    if keys:
        stmt = stmt.where(AiModel.model_key.in_(list(keys)))
    return {key: str(model_id) for key, model_id in session.execute(stmt)}


def hosted_models(session: Session) -> dict[str, str]:
    """The models hosted providers run, key -> id: what the remote worker claims."""
    stmt = select(AiModel.model_key, AiModel.id).where(AiModel.provider != LOCAL)
    return {key: str(model_id) for key, model_id in session.execute(stmt)}


def model_by_key(session: Session, model_key: str) -> AiModel:
    model = session.scalar(select(AiModel).where(AiModel.model_key == model_key))
    if model is None:
        raise InvalidRequest(f"Unknown model_key {model_key!r}; GET /v1/models lists them.")
    return model


# A submit's model and pose template in one round trip; built once (see `submit_choices`).
_CHOICES = (
    select(AiModel, PoseTemplate)
    .select_from(AiModel)
    .outerjoin(
        PoseTemplate,
        or_(PoseTemplate.key == bindparam("ref"), PoseTemplate.id == bindparam("ref_id")),
    )
    .where(AiModel.model_key == bindparam("model_key"))
    .limit(1)
)


def submit_choices(
    session: Session, model_key: str, template_ref: str | None
) -> tuple[AiModel, PoseTemplate | None]:
    """The model and, when one is named (by key or id), the pose template of a submit."""
    row = session.execute(
        _CHOICES,
        {
            "model_key": model_key,
            "ref": template_ref,
            "ref_id": template_ref if template_ref and is_uuid(template_ref) else None,
        },
    ).first()
    if row is None:
        raise InvalidRequest(f"Unknown model_key {model_key!r}; GET /v1/models lists them.")
    model, template = row
    if template_ref and template is None:
        raise InvalidRequest(
            f"Unknown pose_template_id {template_ref!r}; GET /v1/pose-templates lists them."
        )
    return model, template


def pose_template(session: Session, ref: str) -> PoseTemplate:
    """A pose template by its id or key."""
    where = PoseTemplate.id == ref if is_uuid(ref) else PoseTemplate.key == ref
    template = session.scalar(select(PoseTemplate).where(where))
    if template is None:
        raise NotFound(f"No pose template {ref!r}; GET /v1/pose-templates lists them.")
    return template


def pose_templates(session: Session) -> Sequence[PoseTemplate]:
    return session.scalars(select(PoseTemplate).order_by(PoseTemplate.key)).all()


def validate_keypoints(keypoints: object) -> list[list[float] | None]:
    if not isinstance(keypoints, list) or len(keypoints) != len(COCO18_NAMES):
        raise ValueError(f"keypoints must be a list of {len(COCO18_NAMES)} COCO-18 points")
    out: list[list[float] | None] = []
    for point in keypoints:
        if point is None:
            out.append(None)
            continue
        if not (isinstance(point, list) and len(point) == 2):
            raise ValueError(f"keypoint {point!r} is not [x, y]")
        x, y = float(point[0]), float(point[1])
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise ValueError(f"keypoint {point!r} is outside 0..1")
        out.append([x, y])
    return out


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
