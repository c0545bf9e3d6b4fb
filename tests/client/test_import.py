"""`posegen.client` is for the base install on a machine that runs no part of posegen: it
imports none of the server's packages, no database driver and no torch."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.services import ROOT

SERVER_SIDE = ("api", "worker", "db", "torch", "diffusers", "sqlalchemy", "celery", "fastapi")


def test_the_client_imports_nothing_of_the_server():
    code = "import json, sys, posegen.client; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = {name.split(".")[0] for name in json.loads(out.stdout)}
    assert loaded.isdisjoint(SERVER_SIDE), loaded & set(SERVER_SIDE)
    assert {"httpx", "httpx_sse", "tenacity"} <= loaded
