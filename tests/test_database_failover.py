"""The database goes away and comes back, for real: a Postgres server of this module's own
(initdb in a temporary directory, on a free port) that the tests stop, restart and whose
backends they terminate, with a real API process in front of it.

While the database is down every route answers 503 `unavailable` with Retry-After; once it is
back, no request fails, not even the first on each pooled connection that the outage killed.
Afterwards the rows are counted: one job and one charge per accepted submit, nothing for the
refused ones."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session

from db.models import CreditLedger, Generation, User
from db.session import make_session_factory
from posegen import accounts
from posegen.cli.common import upgrade_database
from tests.factories import png_bytes
from tests.processes import start_api
from tests.services import free_port, seeded_engine

pytestmark = pytest.mark.slow


class PrivateServer:
    """A Postgres cluster this module owns: start, stop, restart, terminate its backends."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            pytest.skip("no Postgres server binaries (pg_ctl) on this machine")
        self.bin = Path(found[-1]).parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="posegen-pg-"))
        self.data = self.dir / "data"
        # Postgres refuses to run as root: run it as the packaged `postgres` user then.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/posegen"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin / tool), *args],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip

    def _ctl(self, action: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.dir / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "-m", "fast", action)  # fmt: skip

    def start(self) -> None:
        self._ctl("start")

    def stop(self) -> None:
        self._ctl("stop")

    def restart(self) -> None:
        self._ctl("restart")

    def terminate_backends(self) -> int:
        """Kill every connection to the database, as a failover does."""
        admin = create_engine(
            self.url.replace("/posegen", "/postgres"), isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = 'posegen' AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        admin.dispose()
        return int(killed)

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # stopped already
            self._ctl("stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def server() -> Iterator[PrivateServer]:
    pg = PrivateServer()
    pg.start()
    admin = create_engine(pg.url.replace("/posegen", "/postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("CREATE DATABASE posegen"))
    admin.dispose()
    upgrade_database(pg.url)
    yield pg
    pg.destroy()


@pytest.fixture(scope="module")
def db_engine(server):
    engine = seeded_engine(server.url)
    yield engine
    engine.dispose()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def api(base_env, server, quiet_broker_url, db_engine, process_logs) -> Iterator[str]:
    """On the module's quiet broker: no worker takes these jobs."""
    env = {**base_env, "POSEGEN_DATABASE_URL": server.url, "POSEGEN_BROKER_URL": quiet_broker_url}
    proc, base = start_api(env, process_logs / "api-failover.log")
    yield base
    proc.stop()


@pytest.fixture
def account(db_engine) -> Iterator[tuple[str, dict[str, str]]]:
    sessions = make_session_factory(db_engine)  # type: ignore[arg-type]
    with sessions() as s:
        user = accounts.create_user(
            s, email=f"failover-{os.urandom(4).hex()}@example.com", credits=100
        )
        raw = accounts.create_key(s, email=user.email).raw
        s.commit()
        yield user.id, {"Authorization": f"Bearer {raw}"}


def _requests(base: str, headers: dict[str, str], job_id: str, n: int) -> list[httpx.Response]:
    """`n` requests at once, on every kind of route (one in five a submit)."""
    form = {"model_key": "tiny-sd15-openpose", "pose_template_id": "standing"}
    image = png_bytes()

    def one(i: int) -> httpx.Response:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            kind = i % 5
            if kind == 0:
                files = {"image": ("p.png", image, "image/png")}
                return client.post("/v1/generations", data=form, files=files)
            if kind == 1:
                return client.get(f"/v1/generations/{job_id}")
            if kind == 2:
                return client.get("/v1/generations", params={"limit": 5})
            if kind == 3:
                return client.get("/v1/models")
            return client.get("/v1/me")

    with ThreadPoolExecutor(max_workers=min(n, 16)) as pool:
        return list(pool.map(one, range(n)))


def _failures(responses: list[httpx.Response]) -> list[tuple[str, int, str]]:
    return [
        (r.request.method + " " + r.request.url.path, r.status_code, r.text[:120])
        for r in responses
        if r.status_code not in (200, 202)
    ]


def _counts(db_engine, user_id: str) -> tuple[int, int, int]:
    with Session(db_engine) as s:  # type: ignore[arg-type]
        jobs = s.scalar(select(func.count()).where(Generation.user_id == user_id))
        charges = s.scalar(
            select(func.count()).where(
                CreditLedger.user_id == user_id, CreditLedger.kind == "charge"
            )
        )
        balance = s.scalar(select(User.credits).where(User.id == user_id))
    return int(jobs or 0), int(charges or 0), int(balance or 0)


def _submit(base: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/generations",
        headers=headers,
        data={"model_key": "tiny-sd15-openpose", "pose_template_id": "standing"},
        files={"image": ("p.png", png_bytes(), "image/png")},
        timeout=30,
    )


def test_every_route_answers_503_while_the_database_refuses_connections(api, server, account, db_engine):  # fmt: skip
    user_id, headers = account
    job_id = _submit(api, headers).json()["id"]
    assert _failures(_requests(api, headers, job_id, 20)) == []  # the pools are warm
    server.stop()
    try:
        down = _requests(api, headers, job_id, 15)
        cancel = httpx.post(f"{api}/v1/generations/{job_id}/cancel", headers=headers, timeout=30)
    finally:
        server.start()
    for response in [*down, cancel]:
        where = (response.request.method, response.request.url.path, response.text[:200])
        assert response.status_code == 503, where
        assert response.json()["error"]["code"] == "unavailable", where
        assert int(response.headers["retry-after"]) > 0, where
    # Back: every request succeeds, the first on each pool included.
    assert _failures(_requests(api, headers, job_id, 20)) == []
    jobs, charges, balance = _counts(db_engine, user_id)
    accepted = 1 + 4 + 4  # one submit, then one in five of twenty requests, twice
    assert (jobs, charges, balance) == (accepted, accepted, 100 - accepted)


@pytest.mark.parametrize("fault", ["terminate_backends", "restart"])
def test_no_request_fails_after_the_database_comes_back(api, server, account, db_engine, fault):
    user_id, headers = account
    job_id = _submit(api, headers).json()["id"]
    # Fill the pools (the sync one for submits and lists, the async one for keys and polls).
    assert _failures(_requests(api, headers, job_id, 40)) == []
    if fault == "terminate_backends":
        assert server.terminate_backends() > 0
    else:
        server.restart()
    after = _requests(api, headers, job_id, 40)
    assert _failures(after) == []
    jobs, charges, balance = _counts(db_engine, user_id)
    accepted = 1 + 8 + 8
    assert (jobs, charges, balance) == (accepted, accepted, 100 - accepted)
