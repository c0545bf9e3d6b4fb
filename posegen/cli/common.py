"""What every CLI command needs: settings, a unit of work, errors shown as one line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from sqlalchemy.orm import Session

from db.session import make_engine, make_session_factory
from posegen import queue
from posegen.errors import PosegenError
from posegen.queue import Dispatcher, make_producer
from posegen.settings import Settings, get_settings


def settings() -> Settings:
    return get_settings()


@contextmanager
def unit_of_work() -> Iterator[Session]:
    """A command's transaction, as the API and the worker run theirs (`posegen.queue`): the
    messages the domain deferred are published after the commit, never dropped. A domain
    error is shown as one line."""
    s = settings()
    engine = make_engine(s.database_url, pool_size=1)
    try:
        with queue.unit_of_work(
            make_session_factory(engine)(), Dispatcher(lambda: make_producer(s))
        ) as session:
            yield session
    except PosegenError as exc:
        typer.secho(f"error: {exc.message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    finally:
        engine.dispose()


def alembic_config(database_url: str) -> object:
    from alembic.config import Config

    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", database_url)
    return config


def upgrade_database(database_url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)  # type: ignore[arg-type]


def downgrade_database(database_url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(database_url), revision)  # type: ignore[arg-type]
