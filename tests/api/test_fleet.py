"""What the API knows of the fleet (api.fleet): which queues the workers serve, asked by a
broadcast that waits about a second for their replies. A submit of a model with a fallback
asks it inside its transaction, so it must never wait on that broadcast."""

from __future__ import annotations

import threading
import time

from api.fleet import Fleet


def _asking() -> bool:
    return any(t.name == "fleet-consumers" for t in threading.enumerate())


def _settled() -> None:
    """No fleet is asking the workers: the threads seen next are the test's."""
    deadline = time.monotonic() + 5
    while _asking() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _asking()


def test_a_stale_answer_is_served_while_the_workers_are_asked_again(app):
    _settled()
    state = app.app.state  # type: ignore[attr-defined]
    fleet = Fleet(state.dispatcher, state.sessions, ttl=0.5)
    started = time.monotonic()
    # No worker consumes this module's broker: the broadcast waits its full second.
    assert fleet.consumers() == {}
    assert time.monotonic() - started >= 0.9
    time.sleep(0.6)  # the answer is stale now
    waits: list[float] = []

    def submit() -> None:
        began = time.monotonic()
        assert fleet.unserved("tiny-sd15-openpose")
        waits.append(time.monotonic() - began)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(waits) == 8 and max(waits) < 0.3, waits
    assert _asking(), "the answer is being refreshed meanwhile"
    _settled()  # the refresh ends


def test_no_answer_yet_is_cannot_tell_for_a_submit(app):
    _settled()
    state = app.app.state  # type: ignore[attr-defined]
    fleet = Fleet(state.dispatcher, state.sessions)
    started = time.monotonic()
    assert fleet.unserved("tiny-sd15-openpose") is False  # not asked yet: no routing
    assert time.monotonic() - started < 0.3 and _asking()
    assert fleet.consumers() == {}  # one who may wait gets the answer being asked
