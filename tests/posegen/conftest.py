"""Fixtures for the domain tests that talk to the database directly."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select
from sqlalchemy.orm import Session

from db.models import AiModel, Generation, new_id
from db.session import make_session_factory
from db.types import utcnow
from posegen import scheduler
from posegen.cli.common import upgrade_database
from tests.services import seeded_engine


@pytest.fixture(params=["postgresql", "sqlite"])
def any_session(request: pytest.FixtureRequest, tmp_path) -> Iterator[Session]:
    if request.param == "postgresql":
        s: Session = request.getfixturevalue("session")
        yield s
        return
    url = f"sqlite:///{tmp_path / 'domain.db'}"
    upgrade_database(url)
    engine = seeded_engine(url)
    with make_session_factory(engine)() as s:  # type: ignore[arg-type]
        yield s
    engine.dispose()  # type: ignore[attr-defined]


def job_row(
    model: AiModel,
    user_id: str,
    *,
    created_at: dt.datetime,
    priority: int = 5,
    status: str = "queued",
    pose_template_id: str | None = None,
) -> dict[str, Any]:
    """A job's columns as the API records them (128 px), for `Generation(**row)` or a bulk
    `insert(Generation)`."""
    return {
        "id": new_id(),
        "user_id": user_id,
        "model_id": model.id,
        "model_key": model.model_key,
        "status": status,
        "prompt": "p",
        "params": {"num_inference_steps": 2, "width": 128, "height": 128},
        "pose_source": "template" if pose_template_id else "image",
        "pose_template_id": pose_template_id,
        "input_key": "inputs/x.png",
        "credit_cost": 1,
        "priority": priority,
        "outputs": [],
        "created_at": created_at,
    }


def tiny_model(session: Session) -> AiModel:
    return session.scalars(select(AiModel).where(AiModel.model_key == "tiny-sd15-openpose")).one()


def make_job(
    session: Session,
    user_id: str,
    *,
    priority: int = 5,
    age_s: float = 0.0,
    status: str = "queued",
    pose_template_id: str | None = None,
) -> str:
    """A job of the tiny model, created `age_s` ago, flushed: its id. A queued one joins its
    turn, as a submit's does."""
    created_at = utcnow() - dt.timedelta(seconds=age_s)
    model = tiny_model(session)
    row = job_row(
        model, user_id, created_at=created_at, priority=priority, status=status,
        pose_template_id=pose_template_id,
    )  # fmt: skip
    job = Generation(**row)
    session.add(job)
    session.flush()
    if status == "queued":
        scheduler.joined(
            session, user_id=user_id, model_id=model.id, priority=priority, since=created_at
        )
    return job.id


@pytest.fixture
def conn(db_engine: Engine) -> Iterator[Connection]:
    """A connection on which Postgres uses an index wherever it can: a plan that still
    scans the table has no index to use."""
    with db_engine.connect() as c:
        c.exec_driver_sql("SET enable_seqscan = off")
        yield c
        c.exec_driver_sql("RESET enable_seqscan")
        c.rollback()


# -- a webhook receiver -------------------------------------------------------------------


class Receiver:
    def __init__(
        self, codes: list[int], *, host: str = "127.0.0.1", port: int = 0, delay: float = 0
    ) -> None:
        """`delay`: seconds each answer takes (a slow endpoint)."""
        self.codes = list(codes)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.arrived: list[float] = []  # time.time() of each request
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.arrived.append(time.time())
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                time.sleep(delay)
                code = receiver.codes.pop(0) if receiver.codes else 200
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.requests) >= count, f"{len(self.requests)} of {count} requests arrived"


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(codes: list[int] | None = None, **where: object) -> Receiver:
        made.append(Receiver(codes or [], **where))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for r in made:
        r.server.shutdown()
