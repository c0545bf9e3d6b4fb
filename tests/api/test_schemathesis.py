"""Property-based requests generated from our own OpenAPI schema.

In process, schemathesis' strategies per operation: never a 500. Against a live API process
and worker, `schemathesis run --checks all`: the server keeps to its schema in every way
schemathesis checks (statuses, bodies, headers, refusing what the schema forbids, accepting
what it allows, links). What no schema can say is told to it in schemathesis_hooks.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.services import ROOT


def test_no_server_errors(app, make_account):
    account = make_account(credits=100_000)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)  # fmt: skip
        def check(case):
            response = case.call_and_validate(headers=account.headers, checks=[not_a_server_error])
            statuses.append(response.status_code)

        check()
    # It really exercised the API: many requests, and both successes and refusals.
    assert len(statuses) > 100
    assert any(s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)


@pytest.mark.slow
def test_all_checks_against_a_live_api_and_worker_find_nothing(
    live_api, gpu_worker, make_account, tmp_path
):
    """`schemathesis run --checks all`, every phase (examples, coverage, fuzzing, stateful
    through the submit's links), against a real API process whose jobs a real worker runs."""
    account = make_account(tier="enterprise", credits=10_000_000)
    run = subprocess.run(
        [
            sys.executable, "-m", "schemathesis.cli", "run", f"{live_api}/openapi.json",
            "--checks", "all", "--header", f"Authorization: Bearer {account.key}",
            "--max-examples", "25", "--seed", "1", "--workers", "1", "--no-color",
        ],
        env={
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.api.schemathesis_hooks",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "POSEGEN_SCHEMATHESIS_MODELS": "tiny-sd15-openpose,tiny-sdxl-openpose",
            "POSEGEN_SCHEMATHESIS_POSES": ",".join(p.stem for p in (ROOT / "seeds" / "pose_templates").glob("*.json")),
            "POSEGEN_SCHEMATHESIS_WEBHOOK": "http://127.0.0.1:9/hook",
        },
        # Its cache folder goes there, not into the work tree.
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-15000:] + run.stderr[-3000:]
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", run.stdout).groups())
    assert generated == passed > 300, run.stdout[-3000:]
