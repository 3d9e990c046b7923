"""Alembic environment for sagakit's migrations (online mode, on a given connection)."""

from __future__ import annotations

from alembic import context

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "sagakit's migrations run on a connection: use sagakit.migrations.upgrade(engine)"
    )
context.configure(
    connection=connection,
    version_table=config.get_main_option("version_table") or "saga_executions_alembic",
)
with context.begin_transaction():
    context.run_migrations()
