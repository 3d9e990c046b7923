"""Alembic migrations for sagakit's tables, and a helper to run them.

Run them from code (``await upgrade(engine)``) or point your own Alembic environment at
``script_location = sagakit:migrations``. Table names default to ``saga_executions``,
``saga_logs`` and ``saga_queues``; pass others as ``executions_table``/``logs_table``/
``queues_table`` (validated identifiers).
Needs the ``migrations`` extra (``pip install 'sagakit[migrations]'``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["upgrade"]


async def upgrade(
    engine: AsyncEngine,
    revision: str = "head",
    *,
    executions_table: str = "saga_executions",
    logs_table: str = "saga_logs",
    queues_table: str = "saga_queues",
) -> None:
    """Migrate the database behind ``engine`` to ``revision`` (default: the newest). Table
    names are checked as :class:`~sagakit.storage.schema.SagaTables` checks them (ValueError)
    before anything is written."""
    from alembic import command
    from alembic.config import Config

    from sagakit.storage.schema import SagaTables

    # the names, checked before anything is written
    SagaTables(executions_table, logs_table, queues_table=queues_table)
    config = Config()
    config.set_main_option("script_location", "sagakit:migrations")
    config.set_main_option("version_table", f"{executions_table}_alembic")
    config.attributes["executions_table"] = executions_table
    config.attributes["logs_table"] = logs_table
    config.attributes["queues_table"] = queues_table

    def run(connection: Any) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    async with engine.begin() as conn:
        await conn.run_sync(run)
