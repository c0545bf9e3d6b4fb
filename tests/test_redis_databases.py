"""The Redis databases lent to test modules (`RedisDatabases` in tests/services.py): one holder
at a time, emptied when given back, never database 0, a clear error when none is left, and a
worker that listens on one is seen (the guarantee behind `quiet_broker_url`)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import redis

from tests.factories import eventually
from tests.processes import Proc
from tests.services import RedisDatabases, consumers


def _number(url: str) -> int:
    return int(url.rsplit("/", 1)[1])


def test_each_holder_gets_a_database_of_its_own_emptied_when_given_back(
    redis_databases: RedisDatabases,
) -> None:
    with redis_databases.take() as first, redis_databases.take() as second:
        assert first != second and 0 not in (_number(first), _number(second))
        assert redis.Redis.from_url(first).dbsize() == 0
        redis.Redis.from_url(first).set("left", "behind")
    assert redis.Redis.from_url(first).dbsize() == 0


def test_running_out_of_databases_is_an_error_that_says_so(
    redis_databases: RedisDatabases,
) -> None:
    count = int(redis.Redis.from_url(redis_databases.server).config_get("databases")["databases"])
    taken: list[str] = []
    with contextlib.ExitStack() as stack:
        with pytest.raises(RuntimeError, match="no Redis database left to lend"):
            while True:
                taken.append(stack.enter_context(redis_databases.take()))
        numbers = {_number(url) for url in taken}
        assert len(numbers) == len(taken) and 0 not in numbers and len(taken) < count
    # Given back: lent again.
    with redis_databases.take() as again:
        assert again in taken


def test_a_worker_left_on_a_database_is_seen_and_fails_its_holder(
    redis_databases: RedisDatabases,
    base_env: dict[str, str],
    db_engine: object,
    process_logs: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_databases, "settle_s", 1.0)
    args = ["worker", "--queues", "maintenance", "--concurrency", "1"]
    worker: Proc | None = None
    try:
        with (
            pytest.raises(AssertionError, match="still consuming from"),
            redis_databases.take() as url,
        ):
            env = {**base_env, "POSEGEN_BROKER_URL": url}
            worker = Proc(args, env, process_logs / "left-worker.log").start()
            assert eventually(lambda: bool(consumers(url)), timeout=90), worker.tail()
            assert consumers(base_env["POSEGEN_BROKER_URL"]) == []  # only where it listens
    finally:
        if worker is not None:
            worker.stop()
    assert eventually(lambda: consumers(url) == [], timeout=10)
