"""Fallback ("Auto"): a local model's queued jobs routed to its hosted twin, by waiting (the
reconciler) and at submit when no worker serves the model. A routed job keeps its price, says
where it went, leaves its model's turn for the fallback's, and runs once: never on a local
worker and the remote one both (raced on Postgres)."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import AiModel, CreditLedger, Generation, QueueTurn
from db.types import utcnow
from posegen import lifecycle, reconciler, routing, scheduler
from posegen.queue import REMOTE_QUEUE, model_queue
from posegen.settings import Settings
from tests.factories import submit
from tests.posegen.test_scheduler import claim_all, model, queue, user
from tests.services import free_port

LOCAL_KEY, HOSTED_KEY = "tiny-sd15-openpose", "test-tiny-hf"
AFTER = Settings(fallback_after_seconds=5)


def _with_fallback(s: Session) -> tuple[AiModel, AiModel]:
    """A hosted twin of the tiny model (the tests' catalog has none of its size), named as
    the tiny model's fallback."""
    tiny = model(s, LOCAL_KEY)
    twin = {c: getattr(tiny, c) for c in ("family", "base_model", "controlnet_model", "tier")}
    hosted = AiModel(
        model_key=HOSTED_KEY, name="twin", provider="huggingface", author="posegen",
        remote_model="posegen/tiny", credit_cost=9, resolution=tiny.resolution, quality="dev",
        priority=tiny.priority, default_steps=2, guidance_scale=7.0, default_prompt="p",
        processing_time="x", **twin,
    )  # fmt: skip
    s.add(hosted)
    tiny.fallback_model_key = HOSTED_KEY
    s.commit()
    return tiny, hosted


@pytest.fixture
def restore(db_engine: object) -> Iterator[None]:
    yield
    with Session(db_engine) as s:  # type: ignore[arg-type]
        s.execute(update(AiModel).values(fallback_model_key=None))
        s.commit()


def _turns(s: Session) -> dict[str, int]:
    rows = s.execute(select(QueueTurn.model_id, func.sum(QueueTurn.queued)).group_by(QueueTurn.model_id))  # fmt: skip
    return {str(m): int(n) for m, n in rows}


def test_a_job_that_waited_too_long_goes_to_the_fallback_once_at_its_price(
    any_session: Session, restore: None
) -> None:
    s = any_session
    tiny, hosted = _with_fallback(s)
    u = user(s, "waiting")
    old = queue(s, u, 2, age_s=10)
    (young,) = queue(s, u, 1, age_s=0)
    sweep = reconciler.reconcile(s, settings=AFTER)
    outbox = [m.queue for m in s.info.get("outbox", [])]
    s.commit()
    assert sweep.routed == 2 and outbox.count(REMOTE_QUEUE) == 2
    for job_id in old:
        job = s.get_one(Generation, job_id, populate_existing=True)
        assert (job.status, job.model_key, job.routed_to) == ("queued", LOCAL_KEY, HOSTED_KEY)
        assert (job.model_id, job.provider, job.credit_cost) == (hosted.id, "huggingface", 1)
    # The turns follow: one job left in the local model's, two in the fallback's.
    assert _turns(s) == {tiny.id: 1, hosted.id: 2} and scheduler.drifted(s) == []
    assert reconciler.reconcile(s, settings=AFTER).routed == 0  # once
    s.commit()
    assert claim_all(s, [tiny.id]) == [young]
    assert claim_all(s, [hosted.id]) == old
    charges = s.scalar(select(func.count()).select_from(CreditLedger).where(CreditLedger.kind == "charge"))  # fmt: skip
    assert charges == 3  # charged once each, at the local model's price


def test_no_routing_unless_configured(any_session: Session, restore: None) -> None:
    s = any_session
    u = user(s, "plain")
    queue(s, u, 2, age_s=60)
    assert reconciler.reconcile(s, settings=AFTER).routed == 0  # no fallback named
    _with_fallback(s)
    assert reconciler.reconcile(s, settings=Settings()).routed == 0  # no waiting limit
    s.commit()
    assert s.scalar(select(func.count()).where(Generation.routed_to.is_not(None))) == 0


@pytest.mark.parametrize(
    "misfit",
    [{"tier": "pro"}, {"resolution": "1024x1024"}, {"coming_soon": True}],
    ids=["a higher tier", "another size", "coming soon"],
)
def test_a_fallback_that_does_not_fit_its_model_takes_no_job(
    any_session: Session, restore: None, misfit: dict[str, object]
) -> None:
    s = any_session
    tiny, hosted = _with_fallback(s)
    assert routing.fallback_of(s, tiny) == hosted  # as seeded: it fits
    # Changed after seeding (the seed refuses it): a free job must not run on it.
    for field, value in misfit.items():
        setattr(hosted, field, value)
    s.commit()
    assert routing.fallback_of(s, tiny) is None
    u = user(s, "misfit")
    queue(s, u, 2, age_s=60)
    assert reconciler.reconcile(s, settings=AFTER).routed == 0
    s.commit()
    assert s.scalar(select(func.count()).where(Generation.routed_to.is_not(None))) == 0
    job = Generation(model_id=tiny.id)
    routing.at_submit(s, job, model=tiny, unserved=lambda _: True)
    assert job.routed_to is None and job.model_id == tiny.id
    s.rollback()


def test_local_claims_and_the_router_never_both_take_a_job(
    session: Session, sessions: object, restore: None
) -> None:
    tiny, hosted = _with_fallback(session)
    jobs = [j for n in range(6) for j in queue(session, user(session, f"r{n}"), 6, age_s=10)]
    claimed: list[str] = []
    lock = threading.Lock()
    go = threading.Barrier(4)

    def local(name: str) -> None:
        go.wait()
        with sessions() as s:  # type: ignore[operator]
            while (c := lifecycle.claim_next(
                s, worker_id=name, models=[tiny.id], lease_seconds=60, settings=AFTER
            )) is not None:  # fmt: skip
                s.commit()
                with lock:
                    claimed.append(c.job.id)

    def router() -> None:
        go.wait()
        for _ in range(20):
            with sessions() as s:  # type: ignore[operator]
                routing.route_waiting(s, settings=AFTER, now=utcnow(), batch=5)
                s.commit()

    threads = [threading.Thread(target=local, args=(f"gpu-{i}",)) for i in range(3)]
    threads.append(threading.Thread(target=router))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    claimed += claim_all(session, [tiny.id])  # any a claimer gave up on while the router held it
    remote = claim_all(session, [hosted.id])
    session.expire_all()
    rows = {j.id: j for j in session.scalars(select(Generation).where(Generation.id.in_(jobs)))}
    assert sorted(claimed + remote) == sorted(jobs)  # every job ran, once
    assert not set(claimed) & set(remote)
    assert all(rows[j].routed_to is None and rows[j].attempts == 1 for j in claimed)
    assert all(rows[j].routed_to == HOSTED_KEY and rows[j].attempts == 1 for j in remote)
    assert scheduler.drifted(session) == [] and _turns(session) == {tiny.id: 0, hosted.id: 0}


def test_a_job_submitted_while_no_worker_serves_its_model_goes_to_the_fallback(
    app, make_account, session, broker_url, restore
) -> None:
    account = make_account(credits=10)
    plain = submit(app, account, model_key=LOCAL_KEY).json()
    assert plain["routed_to"] is None  # no fallback named: it waits for a GPU
    # The workers' answer, asked on a thread when first needed: a submit does not wait for it.
    app.app.state.fleet.consumers()
    _with_fallback(session)
    routed = submit(app, account, model_key=LOCAL_KEY).json()
    assert (routed["model_key"], routed["routed_to"], routed["credit_cost"]) == (
        LOCAL_KEY, HOSTED_KEY, 1,
    )  # fmt: skip
    assert routed["status"] == "queued"
    broker = redis.Redis.from_url(broker_url)
    assert broker.llen(REMOTE_QUEUE) == 1 and broker.llen(model_queue(LOCAL_KEY)) == 1


def test_a_broker_that_cannot_be_asked_routes_nothing_and_fails_no_submit(
    settings, db_engine, make_account, session, restore
) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    _with_fallback(session)
    account = make_account(credits=10)
    # A port nothing listens on: the broker is down for this API.
    down = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}"})
    with TestClient(create_app(down)) as client:
        answers = [submit(client, account, model_key=LOCAL_KEY) for _ in range(2)]
    assert [a.status_code for a in answers] == [202, 202]
    assert [a.json()["routed_to"] for a in answers] == [None, None]  # it cannot tell: no route


def test_several_outputs_are_refused_by_a_hosted_model_and_never_routed(
    app, make_account, session, sessions, broker_url, restore
) -> None:
    """A hosted provider makes one image a call: a submit of several outputs to a hosted model
    is refused with nothing charged or stored, and one to a local model stays on its GPUs
    (at submit while no worker serves it, and after waiting)."""
    _with_fallback(session)
    account = make_account(credits=20)
    refused = submit(app, account, model_key=HOSTED_KEY, num_outputs=2)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "invalid_request"
    assert submit(app, account, model_key=HOSTED_KEY).status_code == 202  # one output: taken
    kept = submit(app, account, model_key=LOCAL_KEY, num_outputs=2).json()
    assert (kept["routed_to"], kept["credit_cost"]) == (None, 2)
    broker = redis.Redis.from_url(broker_url)
    assert broker.llen(REMOTE_QUEUE) == 1 and broker.llen(model_queue(LOCAL_KEY)) == 1
    with sessions() as s:
        rows = s.execute(
            select(Generation.params, CreditLedger.amount)
            .join(CreditLedger, CreditLedger.generation_id == Generation.id)
            .where(Generation.user_id == account.user_id)
        ).all()
        assert sorted((p.get("num_outputs", 1), amount) for p, amount in rows) == [(1, -9), (2, -2)]
        # Waited past POSEGEN_FALLBACK_AFTER_SECONDS: still not routed.
        s.execute(
            update(Generation)
            .where(Generation.id == kept["id"])
            .values(created_at=utcnow() - dt.timedelta(seconds=60))
        )
        assert reconciler.reconcile(s, settings=AFTER).routed == 0
        s.commit()
        assert s.get_one(Generation, kept["id"]).routed_to is None
    assert app.get("/v1/me", headers=account.headers).json()["credits"] == 20 - 9 - 2
