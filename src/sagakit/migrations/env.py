"""Alembic environment for sagakit's migrations (online mode).

Two ways in: ``sagakit.migrations.upgrade(engine)`` hands a connection over through
``config.attributes["connection"]``; the ``alembic`` command line (an ``alembic.ini`` with
``script_location = sagakit:migrations`` and an async ``sqlalchemy.url``) gets an engine built
from the URL. Table names come from ``config.attributes`` or the ``-x executions_table=...`` /
``-x logs_table=...`` / ``-x queues_table=...`` command-line arguments.
"""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine

config = context.config
for key, value in context.get_x_argument(as_dictionary=True).items():
    config.attributes.setdefault(key, value)
version_table = config.get_main_option("version_table") or (
    f"{config.attributes.get('executions_table', 'saga_executions')}_alembic"
)


def run(connection: Any) -> None:
    context.configure(connection=connection, version_table=version_table)
    with context.begin_transaction():
        context.run_migrations()


async def run_from_url(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run)
    finally:
        await engine.dispose()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError(
            "sagakit's migrations need a connection (sagakit.migrations.upgrade(engine)) or "
            "an async sqlalchemy.url in alembic.ini"
        )
    asyncio.run(run_from_url(url))
