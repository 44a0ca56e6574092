"""Alembic's environment for the store: always run through store/migrate.py, which hands over
an open connection (there is no alembic.ini and no URL here)."""

from __future__ import annotations

from alembic import context

from store.migrate import VERSION_TABLE
from store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  version_table=VERSION_TABLE, render_as_batch=True,
                  transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
