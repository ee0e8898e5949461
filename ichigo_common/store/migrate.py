"""Applying and checking migrations (``ichigo db upgrade``); never a side effect of import."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from .db import get_engine


def alembic_config(url: str) -> Config:
    folder = resources.files("migrations")
    cfg = Config(str(folder / "alembic.ini"))
    cfg.set_main_option("script_location", str(folder))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def is_at_head(url: str) -> bool:
    script = ScriptDirectory.from_config(alembic_config(url))
    with get_engine(url).connect() as conn:
        current = MigrationContext.configure(conn).get_current_heads()
    return set(current) == set(script.get_heads())


def ensure_schema(url: str) -> None:
    """Raise a clear error if the database is not migrated to head."""
    if not is_at_head(url):
        raise RuntimeError(f"database {url} is not at the latest schema: run `ichigo db upgrade`")
