"""The reconciler counts the messages waiting on Redis (every priority list of the queue)
and publishes again only as many jobs as messages are missing, from the head of the queue."""

from __future__ import annotations

import datetime as dt

import redis
from sqlalchemy import update

from db.models import Generation
from posegen import reconciler
from posegen.queue import GENERATION_QUEUE, Dispatcher, priority_keys
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
    lists = [key for key in priority_keys(GENERATION_QUEUE) if client.llen(key)]
    assert dispatcher.waiting(GENERATION_QUEUE) == 3
    assert len(lists) == 2, lists  # the two models' priorities: two of kombu's lists

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
                count_waiting=lambda: dispatcher.waiting(GENERATION_QUEUE),
            )
            sent = [m.args[0] for m in s.info.get("outbox", [])]
            dispatcher.commit(s)
        assert result.republished == len(sent)
        return sent

    assert sweep() == []  # an hour in the queue, every message on Redis: nothing to add
    assert waiting_job_ids(quiet_broker_url) == sorted(ids)
    # kombu pops from the right: the oldest message of the highest priority's list (the two
    # tiny-model jobs outrank the sd15 one), the message of the job at the head of the queue.
    lost = client.rpop(lists[0])
    assert lost is not None and job_id_of(lost) == ids[0]
    assert sweep() == [ids[0]]  # exactly the job whose message went, once
    assert waiting_job_ids(quiet_broker_url) == sorted(ids)
    assert sweep() == []
