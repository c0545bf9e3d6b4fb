"""The client's errors and retries against a real API process with no worker (the jobs stay
queued): the contract's codes as exceptions, 429 and 503 retried after the Retry-After the API
sent (or raised at once when that is longer than the caller allows), a submit retried with its
idempotency key so that a gateway's lost answer charges once, and racing replays counted."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from db.models import CreditLedger, Generation
from posegen.client import ApiError, Client
from tests.factories import ledger_kinds, png_bytes
from tests.processes import TcpProxy, start_api

pytestmark = pytest.mark.slow
MODEL = "tiny-sd15-openpose"
BASIC_LIMIT = 2  # submits a minute on the basic tier (the others keep their defaults)


@pytest.fixture(scope="module")
def pg_proxy(database_url):
    url = make_url(database_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    proxy.up()
    yield proxy
    proxy.down()


@pytest.fixture(scope="module")
def api(base_env, database_url, quiet_broker_url, db_engine, pg_proxy, process_logs):
    """A real API process that reaches Postgres through `pg_proxy`, publishing where no worker
    listens."""
    database = make_url(database_url).set(port=pg_proxy.port, host="127.0.0.1")
    env = {
        **base_env,
        "POSEGEN_DATABASE_URL": database.render_as_string(hide_password=False),
        "POSEGEN_BROKER_URL": quiet_broker_url,
        "POSEGEN_RATE_LIMIT_PER_MINUTE": f"basic={BASIC_LIMIT}",
    }
    proc, base = start_api(env, process_logs / "api-client-errors.log")
    yield base
    proc.stop()


def _jobs_and_charges(sessions, user_id: str) -> tuple[int, int]:
    with sessions() as s:
        jobs = s.scalar(select(func.count()).where(Generation.user_id == user_id))
        charges = s.scalar(
            select(func.count()).where(
                CreditLedger.user_id == user_id, CreditLedger.kind == "charge"
            )
        )
    return int(jobs or 0), int(charges or 0)


def _submit(client: Client, **fields) -> dict:
    return client.submit(png_bytes(), model_key=MODEL, pose_template_id="standing", **fields)


def test_errors_carry_the_contracts_code_and_status(api, make_account, sessions):
    broke = make_account(credits=0)
    with Client(api, broke.key) as client:
        with pytest.raises(ApiError) as caught:
            _submit(client)
        assert (caught.value.status, caught.value.code) == (402, "insufficient_credits")
        assert caught.value.message and caught.value.retry_after is None
        with pytest.raises(ApiError) as caught:
            client.get(str(uuid.uuid4()))
        assert (caught.value.status, caught.value.code) == (404, "not_found")
        with pytest.raises(ApiError) as caught:
            client.submit(
                png_bytes(), model_key=MODEL, pose_template_id="t-pose", pose_image=png_bytes()
            )
        assert (caught.value.status, caught.value.code) == (422, "invalid_request")
        with pytest.raises(ApiError) as caught:
            client.submit(b"not an image", model_key=MODEL, pose_template_id="t-pose")
        assert caught.value.status in (402, 415)  # the cheaper refusal may come first
    with Client(api, "pk_wrong") as client, pytest.raises(ApiError) as caught:
        client.me()
    assert (caught.value.status, caught.value.code) == (401, "unauthorized")
    assert _jobs_and_charges(sessions, broke.user_id) == (0, 0)
    with pytest.raises(TypeError, match="colour"):
        Client(api, broke.key).submit(png_bytes(), model_key=MODEL, colour="red")  # type: ignore[call-arg]


def test_cancel_refunds_once_and_a_second_cancel_is_409(api, make_account, sessions):
    account = make_account(credits=3)
    with Client(api, account.key) as client:
        job = _submit(client)
        assert client.cancel(job["id"])["status"] == "canceled"
        with pytest.raises(ApiError) as caught:
            client.cancel(job["id"])
        assert (caught.value.status, caught.value.code) == (409, "already_finished")
        assert client.me()["credits"] == 3
        client.delete(job["id"])
        assert client.get(job["id"])["deleted_at"]
    assert ledger_kinds(sessions, job["id"]) == {"charge": 1, "refund": 1}


def test_503_is_retried_after_its_retry_after(api, make_account, sessions, pg_proxy):
    """The database goes away: the API answers 503 `unavailable` with Retry-After: 5. The
    client waits those 5 s and sends the submit again; by then the database is back."""
    account = make_account(credits=3)
    with Client(api, account.key, max_retry_wait=10) as client:
        pg_proxy.down()
        threading.Timer(1.0, pg_proxy.up).start()
        started = time.monotonic()
        job = _submit(client)
        elapsed = time.monotonic() - started
    assert job["status"] == "queued"
    # Sent again after the 5 s asked for (with the database up, a submit takes milliseconds).
    assert 5 <= elapsed < 15
    assert _jobs_and_charges(sessions, account.user_id) == (1, 1)


def test_a_retry_after_beyond_the_callers_limit_is_raised_at_once(api, make_account, pg_proxy):
    account = make_account(credits=3)
    with Client(api, account.key, max_retry_wait=1) as client:
        pg_proxy.down()
        try:
            started = time.monotonic()
            with pytest.raises(ApiError) as caught:
                client.me()
            elapsed = time.monotonic() - started
        finally:
            pg_proxy.up()
    assert (caught.value.status, caught.value.code, caught.value.retry_after) == (
        503,
        "unavailable",
        5,
    )
    assert elapsed < 1


def test_rate_limited_submit_raises_429_with_its_retry_after(api, make_account, sessions):
    account = make_account(tier="basic", credits=10)
    with Client(api, account.key, max_retry_wait=5) as client:
        for _ in range(BASIC_LIMIT):
            _submit(client)
        started = time.monotonic()
        with pytest.raises(ApiError) as caught:
            _submit(client)
    assert time.monotonic() - started < 2  # a minute's wait is past the caller's limit
    assert (caught.value.status, caught.value.code) == (429, "rate_limited")
    assert caught.value.retry_after is not None and 5 < caught.value.retry_after <= 60
    assert _jobs_and_charges(sessions, account.user_id) == (BASIC_LIMIT, BASIC_LIMIT)


class LossyGateway:
    """A reverse proxy in front of the API that loses the API's answer to the first submit
    and answers 503 itself, as a gateway whose upstream timed out would: the job was made."""

    def __init__(self, upstream: str) -> None:
        self.keys: list[str | None] = []
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> httpx.Response:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                return httpx.request(
                    self.command, upstream + self.path, headers=headers, content=body
                )

            def _answer(self, response: httpx.Response) -> None:
                self.send_response(response.status_code)
                for name in ("content-type", "retry-after", "location"):
                    if name in response.headers:
                        self.send_header(name, response.headers[name])
                self.send_header("content-length", str(len(response.content)))
                self.end_headers()
                self.wfile.write(response.content)

            def do_POST(self) -> None:
                response = self._forward()
                gateway.keys.append(self.headers.get("idempotency-key"))
                if len(gateway.keys) == 1:
                    response = httpx.Response(
                        503, text="upstream timed out", headers={"Retry-After": "0"}
                    )
                self._answer(response)

            def do_GET(self) -> None:
                self._answer(self._forward())

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_lost_answer_to_a_submit_is_retried_with_the_same_key(api, make_account, sessions):
    account = make_account(credits=3)
    gateway = LossyGateway(api)
    try:
        with Client(gateway.url, account.key) as client:
            job = _submit(client)
            assert client.me()["credits"] == 2
    finally:
        gateway.server.shutdown()
    assert len(gateway.keys) == 2 and gateway.keys[0] and gateway.keys[0] == gateway.keys[1]
    assert _jobs_and_charges(sessions, account.user_id) == (1, 1)
    assert ledger_kinds(sessions, job["id"]) == {"charge": 1}


def test_racing_submits_with_one_key_make_one_job(api, make_account, sessions):
    account = make_account(credits=10)
    key = f"order-{uuid.uuid4()}"
    with Client(api, account.key) as client, ThreadPoolExecutor(8) as pool:
        jobs = list(pool.map(lambda _: _submit(client, idempotency_key=key, seed=5), range(8)))
    assert len({j["id"] for j in jobs}) == 1
    assert _jobs_and_charges(sessions, account.user_id) == (1, 1)
    with Client(api, account.key) as client, ThreadPoolExecutor(4) as pool:
        fresh = list(pool.map(lambda _: _submit(client, seed=5), range(4)))
    assert len({j["id"] for j in fresh}) == 4  # no key given: the client makes one each
    assert _jobs_and_charges(sessions, account.user_id) == (5, 5)
