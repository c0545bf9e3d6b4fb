"""Signed webhooks to a real HTTP receiver on loopback, retried by the housekeeping worker."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from posegen import accounts, webhooks
from posegen.webhooks import RefusedUrl
from tests.conftest import submit, wait_for


class Receiver:
    def __init__(self, codes: list[int]) -> None:
        self.codes = list(codes)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                code = receiver.codes.pop(0) if receiver.codes else 200
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.requests) >= count, f"{len(self.requests)} of {count} requests arrived"


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(codes: list[int] | None = None) -> Receiver:
        made.append(Receiver(codes or []))
        return made[-1]

    yield make
    for r in made:
        r.server.shutdown()


pytestmark = pytest.mark.slow


def test_completed_event_is_signed_with_the_users_secret(
    app, make_account, gpu_worker, housekeeping, receiver
):
    hook = receiver()
    account = make_account()
    secret = app.get("/v1/me", headers=account.headers).json()["webhook_secret"]
    job = submit(app, account, webhook_url=hook.url).json()
    assert wait_for(app, account, job["id"])["status"] == "completed"
    hook.wait(1)
    headers, body = hook.requests[0]
    assert webhooks.verify(secret=secret, headers=headers, body=body)
    assert not webhooks.verify(secret=accounts.new_webhook_secret(), headers=headers, body=body)
    event = json.loads(body)
    assert event["type"] == "generation.completed" and event["data"]["id"] == job["id"]
    assert event["data"]["status"] == "completed" and event["data"]["outputs"]


def test_500_twice_then_200_is_three_attempts_with_one_id(
    app, make_account, gpu_worker, housekeeping, receiver, sessions
):
    from sqlalchemy import select

    from db.models import WebhookDelivery

    hook = receiver([500, 500, 200])
    account = make_account()
    job = submit(app, account, webhook_url=hook.url).json()
    wait_for(app, account, job["id"])
    hook.wait(3)
    time.sleep(1.5)  # room for a wrong fourth attempt to show up
    assert len(hook.requests) == 3
    assert len({h["webhook-id"] for h, _ in hook.requests}) == 1
    with sessions() as s:
        delivery = s.scalar(
            select(WebhookDelivery).where(WebhookDelivery.generation_id == job["id"])
        )
        assert delivery.status == "delivered" and delivery.attempts == 3
        assert [a["status_code"] for a in delivery.attempt_log] == [500, 500, 200]
    import httpx

    metrics = httpx.get(housekeeping.metrics_url).text
    assert 'posegen_webhook_attempts_total{outcome="http_error"}' in metrics
    assert 'posegen_webhook_attempts_total{outcome="success"}' in metrics


def test_failed_job_sends_generation_failed(app, make_account, gpu_worker, housekeeping, receiver):
    hook = receiver()
    account = make_account()
    job = submit(app, account, pose_template_id=None, webhook_url=hook.url).json()  # blank photo
    assert wait_for(app, account, job["id"])["status"] == "failed"
    hook.wait(1)
    event = json.loads(hook.requests[0][1])
    assert event["type"] == "generation.failed"
    assert event["data"]["error"]["code"] == "no_pose_detected"


def test_410_stops_retrying(app, make_account, housekeeping, receiver, sessions):
    from sqlalchemy import select

    from db.models import WebhookDelivery

    hook = receiver([410])
    account = make_account()
    job = submit(app, account, webhook_url=hook.url).json()
    app.post(f"/v1/generations/{job['id']}/cancel", headers=account.headers)
    hook.wait(1)
    time.sleep(1.5)
    assert len(hook.requests) == 1
    assert json.loads(hook.requests[0][1])["type"] == "generation.canceled"
    with sessions() as s:
        delivery = s.scalar(
            select(WebhookDelivery).where(WebhookDelivery.generation_id == job["id"])
        )
        assert delivery.status == "failed"


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",  # not https
        "https://127.0.0.1/hook",
        "https://localhost/hook",
        "https://10.0.0.5/hook",
        "https://192.168.1.1/hook",
        "https://172.16.0.1/hook",
        "https://169.254.169.254/latest/meta-data",  # cloud metadata
        "https://100.64.0.1/hook",  # CGNAT
        "https://[::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",  # IPv4-mapped IPv6
        "https://0x7f.0.0.1/hook",  # hex encoding of 127.0.0.1
        "https://2130706433/hook",  # decimal encoding of 127.0.0.1
        "https://0177.0.0.1/hook",  # octal
        "https://0.0.0.0/hook",
        "https://user:pw@8.8.8.8/hook",
    ],
)
def test_refused_urls(url):
    with pytest.raises(RefusedUrl):
        webhooks.check_url(url, allow_private=False)


def test_public_https_address_is_allowed():
    webhooks.check_url("https://8.8.8.8/hook", allow_private=False)


def test_private_url_refused_at_submit(settings, db_engine, make_account):
    from fastapi.testclient import TestClient

    from api.app import create_app

    strict = settings.model_copy(update={"webhook_allow_private": False})
    with TestClient(create_app(strict)) as client:
        response = submit(client, make_account(), webhook_url="https://127.0.0.1/hook")
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


def test_send_checks_the_url_again(settings):
    strict = settings.model_copy(update={"webhook_allow_private": False})
    message = webhooks.Outgoing(
        url="https://127.0.0.1/hook", msg_id="m", secret=accounts.new_webhook_secret(), body=b"{}"
    )
    attempt = webhooks.post_signed(message, settings=strict)
    assert attempt.status_code is None and attempt.error.startswith("refused")


def test_connection_goes_to_the_checked_address_with_the_name_in_host(settings, receiver):
    hook = receiver()
    port = hook.server.server_address[1]
    message = webhooks.Outgoing(
        url=f"http://localhost:{port}/hook",
        msg_id="m-1",
        secret=accounts.new_webhook_secret(),
        body=b'{"a":1}',
    )
    attempt = webhooks.post_signed(message, settings=settings)
    assert attempt.ok, attempt
    headers, body = hook.requests[0]
    assert headers["host"] == f"localhost:{port}" and body == b'{"a":1}'
    assert headers["webhook-id"] == "m-1"


def test_redirects_are_not_followed(settings):
    import http.server

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(307)
            self.send_header("Location", "http://169.254.169.254/")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        message = webhooks.Outgoing(
            url=f"http://127.0.0.1:{server.server_address[1]}/",
            msg_id="m",
            secret=accounts.new_webhook_secret(),
            body=b"{}",
        )
        attempt = webhooks.post_signed(message, settings=settings)
    finally:
        server.shutdown()
    assert attempt.status_code == 307 and not attempt.ok
