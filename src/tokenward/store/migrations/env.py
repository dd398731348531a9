"""Alembic environment: migrations run on a connection handed in by :mod:`tokenward.store`."""

from alembic import context

from tokenward.store.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
