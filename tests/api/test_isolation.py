"""The API never imports the worker, torch or diffusers (it installs without them)."""

import subprocess
import sys


def test_api_imports_no_worker_and_no_torch():
    code = (
        "import sys; import api.app, posegen.cli.main; "
        "bad = [m for m in ('torch', 'diffusers', 'worker', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_worker_imports_no_api():
    code = (
        "import sys; import worker.celery_app, worker.runner; "
        "sys.exit(1 if 'api' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
