"""Fixtures for the domain tests that talk to the database directly."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import AiModel, Generation, new_id
from db.session import make_session_factory
from db.types import utcnow
from posegen.cli.common import upgrade_database
from tests.conftest import seeded_engine


@pytest.fixture(params=["postgresql", "sqlite"])
def any_session(request: pytest.FixtureRequest, tmp_path) -> Iterator[Session]:
    if request.param == "postgresql":
        s: Session = request.getfixturevalue("session")
        yield s
        return
    url = f"sqlite:///{tmp_path / 'poll.db'}"
    upgrade_database(url)
    engine = seeded_engine(url)
    with make_session_factory(engine)() as s:  # type: ignore[arg-type]
        yield s
    engine.dispose()  # type: ignore[attr-defined]


def make_job(
    session: Session,
    user_id: str,
    *,
    priority: int = 5,
    age_s: float = 0.0,
    status: str = "queued",
    pose_template_id: str | None = None,
) -> str:
    """A job row as the API records it (tiny model, 128 px), flushed."""
    model = session.scalars(select(AiModel).where(AiModel.model_key == "tiny-sd15-openpose")).one()
    job = Generation(
        id=new_id(),
        user_id=user_id,
        model_id=model.id,
        model_key=model.model_key,
        status=status,
        prompt="p",
        params={"num_inference_steps": 2, "width": 128, "height": 128},
        pose_source="template" if pose_template_id else "image",
        pose_template_id=pose_template_id,
        input_key="inputs/x.png",
        credit_cost=1,
        priority=priority,
        outputs=[],
        created_at=utcnow() - dt.timedelta(seconds=age_s),
    )
    session.add(job)
    session.flush()
    return job.id
