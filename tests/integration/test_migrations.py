"""The shipped Alembic migrations produce exactly the schema declared in schema.py."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from sagakit.migrations import upgrade
from sagakit.storage.schema import SagaTables
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

pytestmark = pytest.mark.integration


async def test_migrations_match_the_declared_schema(sql_storage: Any) -> None:
    prefix = f"mig_{uuid.uuid4().hex[:8]}"
    names = {"executions_table": f"{prefix}_ex", "logs_table": f"{prefix}_logs"}
    engine = sql_storage.engine
    await upgrade(engine, **names)
    declared = SagaTables(**names)
    ours = {declared.executions.name, declared.logs.name}

    def diff(connection: Any) -> list[Any]:
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "include_object": lambda obj, name, kind, *_: (
                    name in ours if kind == "table" else obj.table.name in ours
                    # the partial index exists only where the dialect has partial indexes
                    and not (name.endswith("_recoverable") and engine.dialect.name == "mysql")
                ),
            },
        )
        return list(compare_metadata(context, declared.metadata))

    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(diff) == []
        # The migrated tables work as a storage.
        storage = SqlAlchemySagaStorage(engine, **names)
        saga_id = uuid.uuid4()
        await storage.create_saga(saga_id, "Migrated", {"ok": True})
        assert (await storage.get_saga(saga_id)).context == {"ok": True}
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(declared.metadata.drop_all)
            await conn.execute(sa.text(f"DROP TABLE IF EXISTS {prefix}_ex_alembic"))


async def test_upgrade_twice_is_a_no_op(sql_storage: Any) -> None:
    prefix = f"mig_{uuid.uuid4().hex[:8]}"
    names = {"executions_table": f"{prefix}_ex", "logs_table": f"{prefix}_logs"}
    await upgrade(sql_storage.engine, **names)
    try:
        await upgrade(sql_storage.engine, **names)
        async with sql_storage.engine.connect() as conn:
            version = (await conn.execute(sa.text(f"SELECT version_num FROM {prefix}_ex_alembic"))).scalar()
        assert version == "0001"
    finally:
        async with sql_storage.engine.begin() as conn:
            await conn.run_sync(SagaTables(**names).metadata.drop_all)
            await conn.execute(sa.text(f"DROP TABLE IF EXISTS {prefix}_ex_alembic"))


def test_the_alembic_command_line_runs_the_migrations(tmp_path: Any) -> None:
    import subprocess
    import sys

    db = tmp_path / "cli.db"
    ini = tmp_path / "alembic.ini"
    ini.write_text(
        "[alembic]\nscript_location = sagakit:migrations\n"
        f"sqlalchemy.url = sqlite+aiosqlite:///{db}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ini), "-x", "executions_table=cli_ex",
         "-x", "logs_table=cli_logs", "upgrade", "head"],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    import sqlite3

    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"cli_ex", "cli_logs", "cli_ex_alembic"} <= tables
