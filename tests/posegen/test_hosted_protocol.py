"""The Inference API client (posegen.hosted) against the loopback provider over real HTTP: the
answers the worker tests do not script, each once."""

from __future__ import annotations

import datetime as dt
import email.utils
import io
import socket
import time
from collections.abc import Iterator

import pytest
from PIL import Image
from pydantic import SecretStr

from posegen.errors import JobError
from posegen.hosted import Busy, HostedRequest, HuggingFace, OutOfTime, Stopped, make_client
from posegen.loopback import Answer, LoopbackProvider
from posegen.skeleton import draw_skeleton

TOKEN = "hf_protocol_secret_0987654321"


@pytest.fixture
def provider() -> Iterator[LoopbackProvider]:
    server = LoopbackProvider(token=TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def client(provider: LoopbackProvider) -> Iterator[HuggingFace]:
    with make_client(concurrency=2) as http:
        yield HuggingFace(base_url=provider.url + "/", token=SecretStr(TOKEN), client=http)


def _request() -> HostedRequest:
    buf = io.BytesIO()
    draw_skeleton([(0.5, 0.2), (0.5, 0.3), *[None] * 16], width=64, height=96).save(buf, "PNG")
    return HostedRequest(
        remote_model="org/model", prompt="p", negative_prompt="n", control_png=buf.getvalue(),
        num_inference_steps=2, guidance_scale=7.0, controlnet_conditioning_scale=1.0,
    )  # fmt: skip


def _generate(
    client: HuggingFace, *, within: float = 10.0, busy: list[Busy] | None = None
) -> bytes:
    return client.generate(
        _request(),
        stop_at=time.time() + within,
        on_busy=(busy if busy is not None else []).append,
        should_stop=lambda: False,
    )


def test_the_image_comes_back_at_the_control_images_size(client, provider):
    image = Image.open(io.BytesIO(_generate(client)))
    assert image.size == (64, 96)
    assert provider.received[0].path == "/models/org/model"  # one slash, whatever the base
    assert provider.received[0].authorization == f"Bearer {TOKEN}"


def test_a_retry_after_given_as_a_date_is_waited_for(client, provider):
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    provider.script.append(Answer(429, {"error": "slow down"}, retry_after=email.utils.format_datetime(when, usegmt=True)))  # fmt: skip
    busy: list[Busy] = []
    _generate(client, busy=busy)
    assert len(busy) == 1 and not busy[0].loading and 0.5 <= busy[0].seconds <= 2.0
    assert provider.received[1].at - provider.received[0].at >= 0.5


def test_a_provider_that_echoes_the_token_has_it_blanked(client, provider):
    provider.script.append(Answer(403, {"error": f"token {TOKEN} has no access"}))
    with pytest.raises(JobError) as error:
        _generate(client)
    assert error.value.code == "provider_error" and TOKEN not in error.value.message
    assert "token [token] has no access" in error.value.message


@pytest.mark.parametrize(
    "answer",
    [Answer(503, {"error": "overloaded"}), Answer(200, {"not": "an image"})],
    ids=["503 without an estimate", "200 without an image"],
)
def test_an_answer_that_is_neither_an_image_nor_a_wait_is_a_provider_error(
    client, provider, answer
):
    provider.script.append(answer)
    with pytest.raises(JobError) as error:
        _generate(client)
    assert error.value.code == "provider_error" and str(answer.status) in error.value.message


def test_an_estimate_past_the_stop_time_gives_up_without_waiting(client, provider):
    provider.script.append(Answer(503, {"estimated_time": 30}))
    started = time.monotonic()
    with pytest.raises(OutOfTime):
        _generate(client, within=5)
    assert time.monotonic() - started < 3 and len(provider.received) == 1


def test_a_cancel_stops_the_wait(client, provider):
    provider.script.append(Answer(503, {"estimated_time": 20}))
    canceled_at = time.time() + 1
    started = time.monotonic()
    with pytest.raises(Stopped) as stopped:
        client.generate(
            _request(), stop_at=time.time() + 60, on_busy=lambda _: None,
            should_stop=lambda: time.time() >= canceled_at,
        )  # fmt: skip
    assert not isinstance(stopped.value, OutOfTime) and time.monotonic() - started < 5


def test_an_unreachable_provider_is_a_provider_error(provider):
    with make_client(concurrency=1) as http:
        dead = HuggingFace(base_url="http://127.0.0.1:9", token=None, client=http)
        with pytest.raises(JobError) as error:
            _generate(dead)
    assert error.value.code == "provider_error" and "could not be reached" in error.value.message


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A port that takes no connection: it listens, but its backlog is full, so the kernel
    drops each new SYN and a connect waits until its timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    queued = [socket.socket() for _ in range(3)]
    for sock in queued:
        sock.setblocking(False)
        sock.connect_ex(server.getsockname())
    yield url
    for sock in [*queued, server]:
        sock.close()


def test_a_provider_that_takes_no_connection_is_a_provider_error_not_a_timeout(blackhole):
    with make_client(concurrency=1) as http:
        dead = HuggingFace(
            base_url=blackhole, token=SecretStr(TOKEN), client=http, connect_seconds=0.5
        )
        started = time.monotonic()
        with pytest.raises(JobError) as error:
            _generate(dead, within=30)
    assert error.value.code == "provider_error", error.value
    assert "could not be reached: ConnectTimeout" in error.value.message
    assert TOKEN not in error.value.message and time.monotonic() - started < 10


def test_a_connect_cut_by_the_stop_time_is_out_of_time(blackhole):
    with make_client(concurrency=1) as http:
        dead = HuggingFace(base_url=blackhole, token=None, client=http, connect_seconds=10)
        with pytest.raises(OutOfTime):
            _generate(dead, within=1)
