"""Money and limits under concurrency: parallel clients against a real API process, then the
rows and balances counted (generations, credit_ledger, idempotency_keys, stored inputs)."""

from __future__ import annotations

import io
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, insert, select

from db.models import CreditLedger, Generation, IdempotencyKey, User
from posegen import credits
from tests.factories import png_bytes
from tests.processes import start_api
from tests.services import settings_from

FREE_LIMIT = 30


# Jobs of this module stay queued: its API publishes to the module's quiet broker, which no
# process consumes. The database and the storage root are the module's own, so the rows and the
# stored inputs counted are this module's.
@pytest.fixture(scope="module")
def env(base_env, quiet_broker_url):
    return {
        **base_env,
        "POSEGEN_BROKER_URL": quiet_broker_url,
        # Only the free tier named: the other tiers keep their defaults.
        "POSEGEN_RATE_LIMIT_PER_MINUTE": f"free={FREE_LIMIT}",
    }


@pytest.fixture(scope="module")
def api(env, db_engine, process_logs):
    proc, base = start_api(env, process_logs / "api-races.log")
    yield base
    proc.stop()


@pytest.fixture
def storage_root(env) -> Path:
    return Path(settings_from(env).storage_url.removeprefix("file://"))


def _big_png() -> bytes:
    """1500x1500 of noise: a few hundred milliseconds to decode and fit, so that racing
    submits overlap."""
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _post(base: str, key: str, *, image: bytes, headers: dict | None = None, **fields):
    form = {"model_key": "tiny-sd15-openpose", "pose_template_id": "standing", **fields}
    return httpx.post(
        f"{base}/v1/generations",
        headers={"Authorization": f"Bearer {key}", **(headers or {})},
        data={k: str(v) for k, v in form.items()},
        files={"image": ("p.png", image, "image/png")},
        timeout=60,
    )


def _race(n: int, fn) -> list[httpx.Response]:
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, range(n)))


def _input_dirs(storage_root: Path) -> set[str]:
    """The jobs that have inputs in storage (a folder each)."""
    inputs = storage_root / "inputs"
    return {p.name for p in inputs.iterdir()} if inputs.exists() else set()


def _stored(sessions, user_id: str) -> dict[str, object]:
    """What the database holds for a user: jobs, ledger rows by kind, balance, keys."""
    with sessions() as s:
        jobs = s.scalars(select(Generation.id).where(Generation.user_id == user_id)).all()
        kinds = s.execute(
            select(CreditLedger.kind, func.count())
            .where(CreditLedger.user_id == user_id, CreditLedger.kind != "grant")
            .group_by(CreditLedger.kind)
        ).all()
        balance = s.scalar(select(User.credits).where(User.id == user_id))
        keys = s.scalar(
            select(func.count())
            .select_from(IdempotencyKey)
            .where(IdempotencyKey.user_id == user_id)
        )
    return {"jobs": sorted(jobs), "ledger": dict(kinds), "credits": balance, "keys": keys}


def test_racing_replays_leave_one_charged_job_and_cancel_refunds_only_it(
    api, make_account, sessions, storage_root
):
    account = make_account(credits=5)
    image = _big_png()
    before = _input_dirs(storage_root)
    answers = _race(
        10, lambda _: _post(api, account.key, image=image, headers={"Idempotency-Key": "k-1"})
    )
    assert sorted(r.status_code for r in answers) == [200] * 9 + [202], [r.text for r in answers]
    ids = {r.json()["id"] for r in answers}
    assert len(ids) == 1
    (job_id,) = ids
    stored = _stored(sessions, account.user_id)
    assert stored == {"jobs": [job_id], "ledger": {"charge": 1}, "credits": 4, "keys": 1}
    listed = httpx.get(f"{api}/v1/generations", headers=account.headers).json()["items"]
    assert [j["id"] for j in listed] == [job_id]
    # The losers stored no input: the one job's inputs are all there is.
    assert _input_dirs(storage_root) - before == {job_id}

    canceled = httpx.post(f"{api}/v1/generations/{job_id}/cancel", headers=account.headers)
    assert canceled.status_code == 200, canceled.text
    again = httpx.post(f"{api}/v1/generations/{job_id}/cancel", headers=account.headers)
    assert again.status_code == 409
    stored = _stored(sessions, account.user_id)
    assert stored["ledger"] == {"charge": 1, "refund": 1} and stored["credits"] == 5
    assert httpx.get(f"{api}/v1/me", headers=account.headers).json()["credits"] == 5


def test_a_job_never_charged_refunds_nothing(api, make_account, sessions):
    """The ledger is the proof: a refund copies the job's charge, so a job row without one
    (however it came to be) gives nothing back, on cancel or on any failure path."""
    account = make_account(credits=5)
    job_id = _post(api, account.key, image=png_bytes()).json()["id"]
    with sessions() as s:
        model_id = s.scalar(select(Generation.model_id).where(Generation.id == job_id))
        uncharged = s.execute(
            insert(Generation)
            .values(
                user_id=account.user_id,
                model_id=model_id,
                model_key="tiny-sd15-openpose",
                status="queued",
                prompt="p",
                params={},
                pose_source="image",
                credit_cost=3,
                priority=0,
                outputs=[],
                input_key="inputs/none/image.png",
            )
            .returning(Generation.id)
        ).scalar_one()
        s.commit()
    response = httpx.post(f"{api}/v1/generations/{uncharged}/cancel", headers=account.headers)
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    stored = _stored(sessions, account.user_id)
    assert stored["ledger"] == {"charge": 1} and stored["credits"] == 4
    with sessions() as s:
        assert credits.refund(s, generation_id=uncharged) is None
        s.commit()
    assert _stored(sessions, account.user_id) == stored


def test_rate_limit_is_exact_under_concurrency(api, make_account, sessions, storage_root):
    account = make_account(credits=1000)
    image = png_bytes()
    before = _input_dirs(storage_root)
    answers = _race(60, lambda _: _post(api, account.key, image=image))
    codes = Counter(r.status_code for r in answers)
    assert codes == {202: FREE_LIMIT, 429: 60 - FREE_LIMIT}, codes
    refused = [r for r in answers if r.status_code == 429]
    assert all(r.json()["error"]["code"] == "rate_limited" for r in refused)
    assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in refused)
    stored = _stored(sessions, account.user_id)
    assert len(stored["jobs"]) == FREE_LIMIT
    assert stored["ledger"] == {"charge": FREE_LIMIT}
    assert stored["credits"] == 1000 - FREE_LIMIT
    # A submit refused at the second count had stored its input: it went with the rollback.
    assert _input_dirs(storage_root) - before == set(stored["jobs"])


def test_the_exact_count_does_not_make_other_users_wait(api, make_account, sessions):
    """The second count holds only the caller's own row: while one user's row is locked (as
    a submit of theirs holds it until its commit), that user's next submit waits for it and
    another user's submit goes through."""
    busy, other = make_account(credits=10), make_account(credits=10)
    with sessions() as s, ThreadPoolExecutor(max_workers=2) as pool:
        s.execute(select(User.id).where(User.id == busy.user_id).with_for_update(key_share=True))
        waiting = pool.submit(_post, api, busy.key, image=png_bytes())
        mine = _post(api, other.key, image=png_bytes())
        assert mine.status_code == 202, mine.text
        assert not waiting.done()  # held at the busy user's row
        s.rollback()
        assert waiting.result().status_code == 202
    assert len(_stored(sessions, busy.user_id)["jobs"]) == 1
    assert len(_stored(sessions, other.user_id)["jobs"]) == 1


def test_cheap_refusals_come_before_decoding_and_dns(api, make_account, sessions):
    """Over the limit, or short of credits, a caller is refused before the API decodes the
    upload or looks up the webhook host: a corrupt image and an unresolvable host are never
    reached (they would be 415 and 422)."""
    corrupt = b"\x89PNG\r\n\x1a\n" + b"\x00" * 4096
    poor = make_account(credits=0)
    response = _post(api, poor.key, image=corrupt, webhook_url="https://no-such-host.invalid/h")
    assert response.status_code == 402, response.text
    busy = make_account(credits=1000)
    _race(FREE_LIMIT, lambda _: _post(api, busy.key, image=png_bytes()))
    response = _post(api, busy.key, image=corrupt, webhook_url="https://no-such-host.invalid/h")
    assert response.status_code == 429, response.text
    assert len(_stored(sessions, busy.user_id)["jobs"]) == FREE_LIMIT


def test_a_wrong_key_is_refused_before_the_body_is_read(api):
    """401 while the client is still sending a 9 MB upload: the key is checked from the
    headers. Read after the body, the answer would only come once all of it was sent."""
    host, port = api.removeprefix("http://").split(":")
    body_size = 9 * 1024 * 1024
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            "POST /v1/generations HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            "Authorization: Bearer pg_live_not-a-key\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {body_size}\r\n\r\n"
        )
        sock.sendall(head.encode() + b"--b\r\n" + b"x" * 1024)  # and nothing more
        sock.settimeout(5)
        started = time.monotonic()
        answer = ""
        while '"unauthorized"' not in answer:  # the head and the body may come apart
            chunk = sock.recv(4096).decode(errors="replace")
            if not chunk:
                break
            answer += chunk
    assert answer.startswith("HTTP/1.1 401"), answer
    assert '"unauthorized"' in answer
    assert time.monotonic() - started < 5
