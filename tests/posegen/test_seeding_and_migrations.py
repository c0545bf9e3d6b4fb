"""Migrations up and down on Postgres and SQLite; idempotent seeding; the admin CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from sqlalchemy import create_engine, inspect, text

from posegen import seeding
from posegen.cli.common import downgrade_database, upgrade_database
from tests.services import PG_ADMIN, ROOT

TABLES = {"users", "api_keys", "ai_models", "pose_templates", "generations", "credit_ledger", "webhook_deliveries", "idempotency_keys"}  # fmt: skip


def _roundtrip(url: str) -> None:
    upgrade_database(url)
    engine = create_engine(url)
    assert set(inspect(engine).get_table_names()) >= TABLES
    downgrade_database(url, "base")
    assert not TABLES & set(inspect(engine).get_table_names())
    upgrade_database(url)
    assert set(inspect(engine).get_table_names()) >= TABLES
    engine.dispose()


def test_upgrade_downgrade_upgrade_on_postgres():
    name = f"posegen_mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        _roundtrip(PG_ADMIN.rsplit("/", 1)[0] + f"/{name}")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_upgrade_downgrade_upgrade_on_sqlite(tmp_path):
    _roundtrip(f"sqlite:///{tmp_path / 'p.db'}")


def test_seeding_is_idempotent(session):
    # The session database was seeded at start-up: a second run changes nothing.
    models = seeding.seed_models(session)
    poses = seeding.seed_poses(session)
    assert models.created == [] and models.updated == [] and len(models.unchanged) == 9
    assert poses.created == [] and len(poses.unchanged) >= 4


def test_seed_cli_reports_and_keys_cli_prints_the_key_last(tmp_path):
    env = {**os.environ, "POSEGEN_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}

    def cli(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "posegen.cli.main", *args], env=env, cwd=ROOT, capture_output=True, text=True, check=False)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    cli("db", "upgrade")
    assert "created 9, updated 0, unchanged 0" in cli("seed", "models")
    assert "created 0, updated 0, unchanged 9" in cli("seed", "models")
    assert "created 5" in cli("seed", "poses")
    assert "unchanged 5" in cli("seed", "poses")
    cli("users", "create", "a@example.com", "--tier", "pro", "--credits", "7")
    key = cli("keys", "create", "a@example.com", "--name", "ci").strip().splitlines()[-1]
    assert key.startswith("pg_live_") and len(key) > 40
    assert "balance 10" in cli("credits", "grant", "a@example.com", "3")
    shown = cli("users", "show", "a@example.com")
    assert "tier=pro credits=10" in shown
    old_secret = shown.split("webhook_secret ")[1].strip()
    new_secret = cli("users", "rotate-webhook-secret", "a@example.com").strip()
    assert new_secret.startswith("whsec_") and new_secret != old_secret
    assert "tier=free" in cli("users", "set-tier", "a@example.com", "free")
    assert "active" in cli("keys", "list", "a@example.com")
    assert "revoked" in cli("keys", "revoke", key[:14])


def test_0007_moves_the_author_out_of_provider_and_back(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade_database(url, "0006")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO ai_models (id, model_key, name, provider, family, base_model,"
            " controlnet_model, tier, credit_cost, resolution, quality, priority, default_steps,"
            " guidance_scale, default_prompt, negative_prompt, processing_time, enabled,"
            " coming_soon, updated_at) VALUES ('00000000-0000-0000-0000-000000000001', 'm', 'M',"
            " 'lllyasviel', 'sd15', 'b', 'c', 'free', 3, '512x512', 'q', 3, 30, 7.5, 'p', '', 't',"
            " 1, 0, '2026-01-01 00:00:00')"
        ))  # fmt: skip
    upgrade_database(url)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT provider, author, remote_model FROM ai_models")).one()
        assert tuple(row) == ("local", "lllyasviel", None)
    downgrade_database(url, "0006")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT provider FROM ai_models")).scalar() == "lllyasviel"
    engine.dispose()


def _seed_file(tmp_path, **changes):  # type: ignore[no-untyped-def]
    import yaml

    entries = yaml.safe_load((seeding.SEEDS_DIR / "ai_models.yaml").read_text())
    for key, fields in changes.items():
        next(e for e in entries if e["model_key"] == key).update(fields)
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"sd15-openpose-hf": {"provider": "replicate"}}, "provider must be one of"),
        ({"sd15-openpose-hf": {"remote_model": None}}, "needs remote_model"),
        ({"sd15-openpose": {"fallback_model_key": "tiny-sd15-openpose"}}, "a hosted model"),
        ({"sd15-openpose": {"fallback_model_key": "sdxl-openpose-hf"}}, "resolution and tier"),
        (
            {
                "sd15-openpose": {"fallback_model_key": "sd15-openpose-hf"},
                "sd15-openpose-hf": {"coming_soon": True},
            },
            "coming soon",
        ),
    ],
)
def test_a_seed_with_a_wrong_provider_or_fallback_is_refused(tmp_path, session, changes, says):
    with pytest.raises(ValueError, match=says):
        seeding.seed_models(session, _seed_file(tmp_path, **changes))


def test_a_seeded_fallback_is_stored(tmp_path, session):
    path = _seed_file(tmp_path, **{"sd15-openpose": {"fallback_model_key": "sd15-openpose-hf"}})
    assert seeding.seed_models(session, path).updated == ["sd15-openpose"]
    session.rollback()
