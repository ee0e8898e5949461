"""Alembic environment: URL from ICHIGO settings (or the caller), metadata from the models.

Concurrent upgrades are serialised with a PostgreSQL advisory lock; SQLite uses batch mode
for ALTERs."""

from alembic import context
from sqlalchemy import text

from ichigo_common.settings import get_settings
from ichigo_common.store.db import get_engine
from ichigo_common.store.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().database_url
LOCK_ID = 0x1C4160


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True,
                      render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = get_engine(url)
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": LOCK_ID})
            connection.commit()
        try:
            context.configure(connection=connection, target_metadata=Base.metadata,
                              render_as_batch=connection.dialect.name == "sqlite")
            with context.begin_transaction():
                context.run_migrations()
        finally:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": LOCK_ID})
                connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
