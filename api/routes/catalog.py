"""/v1/models, /v1/pose-templates, /v1/me."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from api.deps import CurrentUser, KeyFirstRoute, ReadSessionDep
from api.openapi import documented
from api.schemas import Me, ModelList, PoseTemplateList
from posegen import catalog
from posegen.seeding import MODEL_FIELDS, OPTIONAL_MODEL_FIELDS
from posegen.skeleton import skeleton_png

router = APIRouter(prefix="/v1", tags=["catalog"], route_class=KeyFirstRoute)


@router.get("/models", response_model=ModelList)
def list_models(_: CurrentUser, session: ReadSessionDep) -> dict[str, Any]:
    return {
        "items": [
            {
                "model_key": m.model_key,
                **{f: getattr(m, f) for f in (*MODEL_FIELDS, *OPTIONAL_MODEL_FIELDS)},
            }
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


@router.get(
    "/pose-templates/{template_id}/image",
    response_class=Response,
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The skeleton, drawn.",
        },
        **documented(401, 404, 422),
    },
)
def pose_template_image(
    template_id: str,
    _: CurrentUser,
    session: ReadSessionDep,
    width: Annotated[int, Query(ge=64, le=2048)] = 512,
    height: Annotated[int, Query(ge=64, le=2048)] = 512,
) -> Response:
    """The template (by id or key) drawn as the OpenPose skeleton a job conditions on."""
    template = catalog.pose_template(session, template_id)
    keypoints = [tuple(k) if k else None for k in template.keypoints]
    return Response(
        skeleton_png(keypoints, width=width, height=height),
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=3600"},
    )


@router.get("/me", response_model=Me)
def me(user: CurrentUser) -> dict[str, Any]:
    return {
        "id": user.id,
        "email": user.email,
        "tier": user.tier,
        "credits": user.credits,
        "webhook_secret": user.webhook_secret,
    }
