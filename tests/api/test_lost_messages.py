"""The reconciler counts the messages waiting on Redis (each model's queue) and publishes
again only as many jobs as messages are missing, from the head of the queue."""

from __future__ import annotations

import datetime as dt

import redis
from sqlalchemy import update

from db.models import Generation
from posegen import reconciler
from posegen.queue import Dispatcher, model_queue
from tests.broker_messages import job_id_of, waiting_job_ids
from tests.factories import submit


def test_only_the_job_whose_message_redis_lost_is_published_again(
    app, make_account, sessions, settings, quiet_broker_url
):
    account = make_account()
    ids = [submit(app, account, model_key=key).json()["id"] for key in (
        "tiny-sd15-openpose", "tiny-sd15-openpose", "sd15-openpose",
    )]  # fmt: skip
    dispatcher: Dispatcher = app.app.state.dispatcher
    client = redis.Redis.from_url(quiet_broker_url)
    tiny, sd15 = model_queue("tiny-sd15-openpose"), model_queue("sd15-openpose")
    assert (dispatcher.waiting(tiny), dispatcher.waiting(sd15)) == (2, 1)  # a queue per model

    def sweep() -> list[str]:
        with sessions() as s:
            s.execute(
                update(Generation).values(
                    published_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
                )
            )
            result = reconciler.reconcile(
                s,
                settings=settings,
                count_waiting=dispatcher.waiting,
            )
            sent = [m.args[0] for m in s.info.get("outbox", [])]
            dispatcher.commit(s)
        assert result.republished == len(sent)
        return sent

    assert sweep() == []  # an hour in the queue, every message on Redis: nothing to add
    assert waiting_job_ids(quiet_broker_url) == sorted(ids)
    # kombu pops from the right: the oldest message of the tiny model's queue, the message of
    # the job at the head of its queue.
    lost = client.rpop(tiny)
    assert lost is not None and job_id_of(lost) == ids[0]
    assert sweep() == [ids[0]]  # exactly the job whose message went, once
    assert waiting_job_ids(quiet_broker_url) == sorted(ids)
    assert sweep() == []
