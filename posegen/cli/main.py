"""`posegen ...`: see the README's CLI table (names fixed by the contract)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from posegen import accounts, credits, seeding
from posegen.cli.common import downgrade_database, settings, unit_of_work, upgrade_database
from posegen.cli.generate import generate
from posegen.cli.processes import register_processes

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="posegen: photo + pose -> avatar."
)
db_app = typer.Typer(no_args_is_help=True, help="Database migrations.")
seed_app = typer.Typer(no_args_is_help=True, help="Seed the model catalog and pose templates.")
users_app = typer.Typer(no_args_is_help=True, help="Users.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys.")
credits_app = typer.Typer(no_args_is_help=True, help="Credits.")
models_app = typer.Typer(no_args_is_help=True, help="Model weights.")
for name, sub in (
    ("db", db_app),
    ("seed", seed_app),
    ("users", users_app),
    ("keys", keys_app),
    ("credits", credits_app),
    ("models", models_app),
):
    app.add_typer(sub, name=name)
register_processes(app)
app.command("generate")(generate)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the migrations (`alembic upgrade head`) to POSEGEN_DATABASE_URL."""
    upgrade_database(settings().database_url, revision)
    typer.echo(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION (`base` for an empty database)."""
    downgrade_database(settings().database_url, revision)
    typer.echo(f"database at {revision}")


@seed_app.command("models")
def seed_models(file: Annotated[Path | None, typer.Argument(exists=True)] = None) -> None:
    """Upsert seeds/ai_models.yaml (idempotent)."""
    with unit_of_work() as session:
        report = seeding.seed_models(session, file)
    typer.echo(f"models: {report.summary()}")


@seed_app.command("poses")
def seed_poses(directory: Annotated[Path | None, typer.Argument(exists=True)] = None) -> None:
    """Upsert seeds/pose_templates/*.json (idempotent)."""
    with unit_of_work() as session:
        report = seeding.seed_poses(session, directory)
    typer.echo(f"pose templates: {report.summary()}")


@users_app.command("create")
def users_create(
    email: str,
    tier: Annotated[str, typer.Option(help="free, basic, pro or enterprise")] = "free",
    credits_: Annotated[int, typer.Option("--credits", min=0)] = 0,
) -> None:
    with unit_of_work() as session:
        user = accounts.create_user(session, email=email, tier=tier, credits=credits_)
        typer.echo(f"user {user.email} id={user.id} tier={user.tier} credits={user.credits}")


@users_app.command("show")
def users_show(email: str) -> None:
    with unit_of_work() as session:
        user = accounts.user_by_email(session, email)
        typer.echo(f"user {user.email} id={user.id} tier={user.tier} credits={user.credits}")
        typer.echo(f"webhook_secret {user.webhook_secret}")


@users_app.command("set-tier")
def users_set_tier(email: str, tier: str) -> None:
    with unit_of_work() as session:
        user = accounts.set_tier(session, email=email, tier=tier)
        typer.echo(f"user {user.email} tier={user.tier}")


@users_app.command("rotate-webhook-secret")
def users_rotate_secret(email: str) -> None:
    """Issue a new webhook signing secret (the old one stops verifying at once)."""
    with unit_of_work() as session:
        user = accounts.rotate_webhook_secret(session, email=email)
        typer.echo(user.webhook_secret)


@keys_app.command("create")
def keys_create(email: str, name: Annotated[str, typer.Option()] = "default") -> None:
    """Print a new API key once, alone on the last line."""
    with unit_of_work() as session:
        new = accounts.create_key(session, email=email, name=name)
    typer.echo(
        f"created key {new.key.prefix}… ({new.key.name}) for {email}; it is shown only once:"
    )
    typer.echo(new.raw)


@keys_app.command("list")
def keys_list(email: str) -> None:
    with unit_of_work() as session:
        for key in accounts.list_keys(session, email=email):
            state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
            typer.echo(f"{key.prefix}  {key.name:<20} {state}  id={key.id}")


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="The key's id or its prefix")]) -> None:
    with unit_of_work() as session:
        revoked = accounts.revoke_key(session, key_id_or_prefix=key)
        typer.echo(f"revoked {revoked.prefix}… ({revoked.name})")


@credits_app.command("grant")
def credits_grant(email: str, amount: int) -> None:
    """Add AMOUNT credits (recorded in the ledger)."""
    with unit_of_work() as session:
        user = accounts.user_by_email(session, email)
        balance = credits.grant(session, user_id=user.id, amount=amount, note="granted by CLI")
        typer.echo(f"{user.email}: +{amount} credits, balance {balance}")


@models_app.command("build-tiny")
def models_build_tiny(force: bool = False) -> None:
    """Build the tiny development models under POSEGEN_MODEL_DIR (no download)."""
    from worker.engine.tiny import build_tiny

    model_dir = settings().model_dir
    built = build_tiny(model_dir, force=force)
    typer.echo(
        f"built {', '.join(p.name for p in built)}"
        if built
        else f"tiny models present in {model_dir}"
    )


@models_app.command("list")
def models_list() -> None:
    """The catalog, and whether each model's weights are on this machine."""
    from posegen.catalog import listed_models
    from worker.engine.resolve import is_present

    model_dir = settings().model_dir
    with unit_of_work() as session:
        for m in listed_models(session):
            state = "coming soon" if m.coming_soon else ("enabled" if m.enabled else "disabled")
            if m.provider != "local":  # no weights here: the provider runs it
                where = f"runs on {m.provider}: {m.remote_model}"
            else:
                present = is_present(m.base_model, model_dir=model_dir) and is_present(
                    m.controlnet_model, model_dir=model_dir
                )
                where = f"weights: {'present' if present else 'missing'}"
                if m.fallback_model_key:
                    where += f", falls back to {m.fallback_model_key}"
            typer.echo(
                f"{m.model_key:<22} {m.family:<5} {m.tier:<10} {m.credit_cost:>3} cr  "
                f"{state:<11} {where}"
            )


@models_app.command("pull")
def models_pull(model_key: str) -> None:
    """Download a model's weights (base, ControlNet, OpenPose annotators) into the HF cache."""
    from posegen.catalog import model_by_key
    from worker.engine.pose.openpose import ANNOTATORS_REPO, WEIGHT_FILES
    from worker.engine.resolve import pull

    with unit_of_work() as session:
        model = model_by_key(session, model_key)
        refs = [model.base_model, model.controlnet_model]
        if model.provider != "local":
            typer.echo(f"{model_key} runs on {model.provider}: no weights to pull")
            raise typer.Exit(0)
    for ref in refs:
        if (settings().model_dir / ref).exists():
            typer.echo(f"{ref}: present in the model dir")
            continue
        typer.echo(f"pulling {ref} ...")
        typer.echo(f"{ref}: {pull(ref)}")
    from huggingface_hub import hf_hub_download

    for name in WEIGHT_FILES:
        hf_hub_download(ANNOTATORS_REPO, name)
    typer.echo("OpenPose annotator weights present")


if __name__ == "__main__":  # pragma: no cover
    app()
