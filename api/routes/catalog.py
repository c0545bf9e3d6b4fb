"""/v1/models, /v1/pose-templates, /v1/me."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import CurrentUser, KeyFirstRoute, ReadSessionDep
from api.schemas import Me, ModelList, PoseTemplateList
from posegen import catalog
from posegen.seeding import MODEL_FIELDS

router = APIRouter(prefix="/v1", tags=["catalog"], route_class=KeyFirstRoute)


@router.get("/models", response_model=ModelList)
def list_models(_: CurrentUser, session: ReadSessionDep) -> dict[str, Any]:
    return {
        "items": [
            {"model_key": m.model_key, **{f: getattr(m, f) for f in MODEL_FIELDS}}
            for m in catalog.listed_models(session)
        ]
    }


@router.get("/pose-templates", response_model=PoseTemplateList)
def list_pose_templates(_: CurrentUser, session: ReadSessionDep) -> dict[str, Any]:
    return {
        "items": [
            {
                "id": t.id,
                "key": t.key,
                "name": t.name,
                "description": t.description,
                "keypoints": t.keypoints,
            }
            for t in catalog.pose_templates(session)
        ]
    }


@router.get("/me", response_model=Me)
def me(user: CurrentUser) -> dict[str, Any]:
    return {
        "id": user.id,
        "email": user.email,
        "tier": user.tier,
        "credits": user.credits,
        "webhook_secret": user.webhook_secret,
    }
