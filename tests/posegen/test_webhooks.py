"""Signed webhooks to a real HTTP receiver on loopback, retried by the housekeeping worker."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from posegen import accounts, webhook_sender, webhook_urls, webhooks
from posegen.webhook_urls import RefusedUrl
from tests.factories import submit, wait_for

# "localhost" in full-width letters: another name until UTS 46 maps it (as resolvers do).
FULL_WIDTH_LOCALHOST = "\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54"


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
    # The Standard Webhooks reference implementation, not our own sign(), checks the signature.
    event = Webhook(secret).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(accounts.new_webhook_secret()).verify(body, headers)
    assert webhook_sender.verify(secret=secret, headers=headers, body=body)
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
        "https://[64:ff9b::7f00:1]/hook",  # NAT64 of 127.0.0.1
        "https://[64:ff9b::808:808]/hook",  # NAT64, even of a public address
        "https://[64:ff9b:1::1]/hook",  # local-use NAT64
        "https://[fec0::1]/hook",  # site-local
        "https://[::7f00:1]/hook",  # IPv4-compatible ::127.0.0.1
        "https://[::808:808]/hook",  # IPv4-compatible ::8.8.8.8
        "https://" + FULL_WIDTH_LOCALHOST + "/hook",  # full-width: localhost once mapped (UTS 46)
    ],
)
def test_refused_urls(url):
    with pytest.raises(RefusedUrl):
        webhook_urls.check_url(url, allow_private=False)


def test_public_https_address_is_allowed():
    webhook_urls.check_url("https://8.8.8.8/hook", allow_private=False)


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
    attempt = asyncio.run(webhook_sender.post_signed(message, settings=strict))
    assert attempt.status_code is None and attempt.error.startswith("refused")


def test_connection_goes_to_the_checked_address_with_the_name_in_host(
    settings, receiver, monkeypatch
):
    """DNS rebinding: the name answers 127.0.0.1 when it is checked and 127.0.0.2 after, with a
    receiver on each; the POST must reach the address that was checked."""
    checked = receiver()
    rebound = receiver(host="127.0.0.2", port=checked.port)
    real_getaddrinfo = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host, port, *args, **kwargs):
        if host != "hooks.rebind.test":
            return real_getaddrinfo(host, port, *args, **kwargs)
        lookups.append(host)
        address = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"
        return real_getaddrinfo(address, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    secret = accounts.new_webhook_secret()
    message = webhooks.Outgoing(
        url=f"http://hooks.rebind.test:{checked.port}/hook",
        msg_id="m-1",
        secret=secret,
        body=b'{"a":1}',
    )
    attempt = asyncio.run(webhook_sender.post_signed(message, settings=settings))
    assert attempt.ok, attempt
    assert rebound.requests == [] and len(checked.requests) == 1
    headers, body = checked.requests[0]
    assert headers["host"] == f"hooks.rebind.test:{checked.port}" and body == b'{"a":1}'
    assert headers["webhook-id"] == "m-1"
    assert Webhook(secret).verify(body, headers) == {"a": 1}
    # The name is not looked up again when it is sent: a sender that did would meet 127.0.0.2.
    assert lookups == ["hooks.rebind.test"]


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
        attempt = asyncio.run(webhook_sender.post_signed(message, settings=settings))
    finally:
        server.shutdown()
    assert attempt.status_code == 307 and not attempt.ok


@pytest.mark.parametrize(
    "url",
    [
        "https://8.8.8.8/a\x01b",
        "https://8.8.8.8/a\x7fb",
        "https://8.8.8.8/a\x85b",  # C1 control
        "https://8.8.8.8/a b",
        "https://8.8.8.8/a\u200bb",  # zero-width space (a format character)
        "https://8.8.8.8/a\u3000b",  # ideographic space
        "https://8.8.8.8/hook\r\nX-Injected: 1",
        "https://exa\u2028mple.com/hook",
        "https://exa_mple\u00e9!.com/hook",  # not a domain name under IDNA
        "https://ex!ample.com/hook",
        "https://[fe80::1%25eth0]/hook",  # zone id
        "https://1.2.3.4.5/hook",  # ends in a number, yet no IPv4 address
        "https://8.8.8.8:0/hook",
        "https://8.8.8.8:99999/hook",
        "ftp://8.8.8.8/hook",
        "https:///hook",
    ],
)
@pytest.mark.parametrize("allow_private", [False, True])
def test_urls_a_sender_cannot_send_are_refused_even_with_private_allowed(url, allow_private):
    with pytest.raises(RefusedUrl):
        webhook_urls.check_url(url, allow_private=allow_private)


@pytest.mark.parametrize(
    "url",
    [
        "https://[64:ff9b::7f00:1]/hook",
        "https://[fec0::1]/hook",
        "https://[::7f00:1]/hook",
    ],
)
def test_the_new_ranges_pass_when_private_addresses_are_allowed(url):
    assert webhook_urls.check_url(url, allow_private=True) == url


@pytest.mark.parametrize(
    ("url", "stored"),
    [
        ("https://8.8.8.8/hook", "https://8.8.8.8/hook"),
        ("HTTPS://8.8.8.8:443/hook", "https://8.8.8.8/hook"),
        ("https://8.8.8.8:8443", "https://8.8.8.8:8443/"),
        ("https://8.8.8.8/p/\u00e4?q=\u00e9&r=1#fragment", "https://8.8.8.8/p/%C3%A4?q=%C3%A9&r=1"),
        ("https://134744072/hook", "https://8.8.8.8/hook"),  # decimal spelling of 8.8.8.8
        ("https://0x8.0x8.0x8.0x8/hook", "https://8.8.8.8/hook"),
        ("https://[2001:4860:4860:0:0:0:0:8888]/hook", "https://[2001:4860:4860::8888]/hook"),
        (
            f"http://{FULL_WIDTH_LOCALHOST}:8080/h",
            "http://localhost:8080/h",
        ),
        ("http://LocalHost/h", "http://localhost/h"),
    ],
)
def test_check_url_returns_the_spelling_that_is_stored_and_sent(url, stored):
    allow_private = not stored.startswith("https://8.8.8.8") and "2001:" not in stored
    assert webhook_urls.check_url(url, allow_private=allow_private) == stored


def test_international_names_are_idna_encoded():
    # No lookup here (the sandbox has no public DNS): the spelling alone.
    target = webhook_urls.normalise("https://B\u00fccher.Example/hook", allow_private=False)
    assert target.url == "https://xn--bcher-kva.example/hook"
    assert (target.host, target.port) == ("xn--bcher-kva.example", 443)


def _ledger_and_jobs(sessions, user_id: str) -> tuple[int, int, int]:
    from sqlalchemy import func, select

    from db.models import CreditLedger, Generation, User

    with sessions() as s:
        jobs = s.scalar(select(func.count()).where(Generation.user_id == user_id))
        ledger = s.scalar(select(func.count()).where(CreditLedger.user_id == user_id))
        return jobs, ledger, s.get_one(User, user_id).credits


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/a\x01b",
        "http://127.0.0.1:{port}/a b",
        "http://127.0.0.1:{port}/a\x85b",
    ],
)
def test_submit_refuses_a_url_the_sender_cannot_send_and_stores_nothing(
    app, make_account, sessions, receiver, url
):
    hook = receiver()
    account = make_account(credits=100)
    before = _ledger_and_jobs(sessions, account.user_id)
    response = submit(app, account, webhook_url=url.format(port=hook.port))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert "webhook_url" in response.json()["error"]["message"]
    after = _ledger_and_jobs(sessions, account.user_id)
    assert after == before and after[0] == 0 and after[2] == 100


def test_submit_stores_the_normalised_url_and_delivers_to_it(
    app, make_account, sessions, housekeeping, receiver
):
    from sqlalchemy import select

    from db.models import Generation, WebhookDelivery

    hook = receiver()
    account = make_account()
    response = submit(
        app, account, webhook_url=f"http://{FULL_WIDTH_LOCALHOST}:{hook.port}/hook?x=\u00e9"
    )
    assert response.status_code == 202, response.text
    job = response.json()
    stored = f"http://localhost:{hook.port}/hook?x=%C3%A9"
    assert job["webhook_url"] == stored
    app.post(f"/v1/generations/{job['id']}/cancel", headers=account.headers)
    hook.wait(1)
    headers, _ = hook.requests[0]
    assert headers["host"] == f"localhost:{hook.port}"
    with sessions() as s:
        assert s.get_one(Generation, job["id"]).webhook_url == stored
        delivery = s.scalar(
            select(WebhookDelivery).where(WebhookDelivery.generation_id == job["id"])
        )
        assert delivery.url == stored
    wait_for_delivery(sessions, job["id"], "delivered")


def wait_for_delivery(sessions, generation_id: str, status: str, timeout: float = 20):
    from sqlalchemy import select

    from db.models import WebhookDelivery

    deadline = time.monotonic() + timeout
    while True:
        with sessions() as s:
            delivery = s.scalar(
                select(WebhookDelivery).where(WebhookDelivery.generation_id == generation_id)
            )
            if delivery is not None and delivery.status == status:
                return delivery
        assert time.monotonic() < deadline, f"delivery still {delivery and delivery.status}"
        time.sleep(0.1)


def _cancel_with(app, sessions, account, *, stored_url: str, hook_url: str) -> str:
    """A canceled job whose row holds `stored_url`, as a version that checked less stored it."""
    from sqlalchemy import update

    from db.models import Generation

    job = submit(app, account, webhook_url=hook_url).json()
    with sessions() as s:
        s.execute(
            update(Generation).where(Generation.id == job["id"]).values(webhook_url=stored_url)
        )
        s.commit()
    response = app.post(f"/v1/generations/{job['id']}/cancel", headers=account.headers)
    assert response.status_code == 200, response.text
    return job["id"]


def _assert_spent_schedule(delivery, settings, error: str) -> None:
    """Every attempt recorded, each after the schedule's delay, and then no more."""
    from datetime import datetime

    schedule = settings.webhook_retry_schedule
    assert delivery.status == "failed" and delivery.next_attempt_at is None
    assert delivery.attempts == len(schedule) + 1 == len(delivery.attempt_log)
    for entry in delivery.attempt_log:
        assert entry["status_code"] is None and error in entry["error"], entry
    times = [datetime.fromisoformat(entry["at"]) for entry in delivery.attempt_log]
    for (earlier, later), delay in zip(itertools.pairwise(times), schedule, strict=True):
        assert (later - earlier).total_seconds() >= delay


@pytest.mark.parametrize(
    ("stored", "error"),
    [
        ("http://127.0.0.1:{port}/a\x01b", "refused: webhook_url contains whitespace or control"),
        ("http://127.0.0.1:{port}/a\x85b", "refused: webhook_url contains whitespace or control"),
    ],
)
def test_a_stored_url_the_sender_cannot_send_is_a_recorded_failed_attempt(
    app, make_account, sessions, settings, housekeeping, receiver, stored, error
):
    hook = receiver()
    job_id = _cancel_with(
        app, sessions, make_account(), stored_url=stored.format(port=hook.port), hook_url=hook.url
    )
    delivery = wait_for_delivery(sessions, job_id, "failed")
    time.sleep(1.5)  # room for a wrong further attempt to show up
    delivery = wait_for_delivery(sessions, job_id, "failed")
    _assert_spent_schedule(delivery, settings, error)
    assert hook.requests == []


def test_a_stored_full_width_host_is_delivered_to_its_ascii_name(
    app, make_account, sessions, housekeeping, receiver
):
    hook = receiver()
    job_id = _cancel_with(
        app,
        sessions,
        make_account(),
        stored_url=f"http://{FULL_WIDTH_LOCALHOST}:{hook.port}/hook",
        hook_url=hook.url,
    )
    hook.wait(1)
    delivery = wait_for_delivery(sessions, job_id, "delivered")
    assert delivery.attempts == 1 and delivery.attempt_log[0]["status_code"] == 200
    assert hook.requests[0][0]["host"] == f"localhost:{hook.port}"


def test_an_attempt_that_raises_is_a_recorded_failed_attempt_on_the_schedule(
    app, make_account, sessions, settings, housekeeping, receiver
):
    """Any exception in an attempt (here: a secret that is not base64, so signing raises)."""
    from sqlalchemy import update

    from db.models import User

    hook = receiver()
    account = make_account()
    with sessions() as s:
        s.execute(update(User).where(User.id == account.user_id).values(webhook_secret="whsec_abc"))
        s.commit()
    job_id = _cancel_with(app, sessions, account, stored_url=hook.url, hook_url=hook.url)
    wait_for_delivery(sessions, job_id, "failed")
    time.sleep(1.5)
    delivery = wait_for_delivery(sessions, job_id, "failed")
    _assert_spent_schedule(delivery, settings, "Error: Incorrect padding")
    assert hook.requests == []
    import httpx

    metrics = httpx.get(housekeeping.metrics_url).text
    assert 'posegen_webhook_attempts_total{outcome="error"}' in metrics
