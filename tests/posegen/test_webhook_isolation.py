"""One customer's slow endpoint never delays another's: the housekeeping worker's sender has
many deliveries in flight, a bound per endpoint, and a circuit per endpoint."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest

from posegen.webhook_sender import Circuit, endpoint_of
from tests.factories import submit

pytestmark = pytest.mark.slow


def test_a_slow_endpoint_does_not_delay_another(app, make_account, housekeeping, receiver):
    slow, fast = receiver(delay=8), receiver()
    slow_user, fast_user = make_account(), make_account()
    for _ in range(12):  # three rounds of the slow endpoint's four slots
        job = submit(app, slow_user, webhook_url=slow.url).json()
        app.post(f"/v1/generations/{job['id']}/cancel", headers=slow_user.headers)
    time.sleep(0.5)  # the slow endpoint's deliveries are under way
    ended = {}
    for _ in range(6):
        job = submit(app, fast_user, webhook_url=fast.url).json()
        ended[job["id"]] = app.post(
            f"/v1/generations/{job['id']}/cancel", headers=fast_user.headers
        ).json()["finished_at"]
    fast.wait(6, timeout=30)
    late = []
    for (_, body), arrived in zip(fast.requests, fast.arrived, strict=True):
        event = json.loads(body)
        at = dt.datetime.fromisoformat(ended[event["data"]["id"]]).timestamp()
        late.append(arrived - at)
    # Not behind the slow endpoint: waiting for one of its answers alone would take 8 s. (On
    # a quiet machine they arrive within 0.1 s: bench.webhooks.)
    assert max(late) < 4, late
    # The slow endpoint had four in flight at a time in each of the housekeeping worker's two
    # processes: at most eight arrived before the first answer.
    assert len([t for t in slow.arrived if t < slow.arrived[0] + 7.5]) <= 8
    slow.wait(12, timeout=40)


def test_the_circuit_pauses_on_the_schedule_and_a_success_closes_it():
    circuit = Circuit(threshold=3, schedule=[5, 30, 120])
    for _ in range(2):
        circuit.record(False)
    assert circuit.paused_for() == 0
    circuit.record(False)
    assert 4.5 < circuit.paused_for() <= 5
    circuit.open_until = time.monotonic()  # the pause is over: tried again
    circuit.record(False)  # one more failure pauses it for the next step
    assert 29.5 < circuit.paused_for() <= 30
    circuit.open_until = time.monotonic()
    circuit.record(True)
    assert circuit.paused_for() == 0 and circuit.failures == 0
    for _ in range(3):
        circuit.record(False)
    assert 4.5 < circuit.paused_for() <= 5  # back to the schedule's first step


def test_endpoints_are_scheme_host_and_port():
    assert endpoint_of("https://a.example.com/x?y") == endpoint_of("https://a.example.com/z")
    assert endpoint_of("https://a.example.com/") != endpoint_of("https://a.example.com:8443/")
    assert endpoint_of("https://a.example.com/") != endpoint_of("https://b.example.com/")
