"""The shipped Alembic migrations produce exactly the schema declared in schema.py, and bring
tables made by an earlier revision, with their sagas, up to it (and back)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext

from sagakit.exceptions import SagaStorageError
from sagakit.migrations import upgrade
from sagakit.queue import QueueSettings
from sagakit.records import SagaStatus, SagaStepStatus
from sagakit.storage.schema import SagaTables
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

pytestmark = pytest.mark.integration

HEAD = "0003"


def _names() -> dict[str, str]:
    prefix = f"mig_{uuid.uuid4().hex[:8]}"
    return {"executions_table": f"{prefix}_ex", "logs_table": f"{prefix}_logs",
            "queues_table": f"{prefix}_queues"}


@pytest.fixture
async def names(sql_storage: Any) -> AsyncIterator[dict[str, str]]:
    """Table names of this test's own; whatever was made under them is dropped afterwards."""
    chosen = _names()
    yield chosen
    async with sql_storage.engine.begin() as conn:
        await conn.run_sync(SagaTables(**chosen).metadata.drop_all)
        await conn.execute(sa.text(f"DROP TABLE IF EXISTS {chosen['executions_table']}_alembic"))


async def _downgrade(engine: Any, revision: str, names: dict[str, str]) -> None:
    """What ``upgrade`` does, the other way (sagakit ships no downgrade helper)."""
    config = Config()
    config.set_main_option("script_location", "sagakit:migrations")
    config.set_main_option("version_table", f"{names['executions_table']}_alembic")
    config.attributes.update(names)

    def run(connection: Any) -> None:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)

    async with engine.begin() as conn:
        await conn.run_sync(run)


async def _revision(engine: Any, names: dict[str, str]) -> str:
    async with engine.connect() as conn:
        return str((await conn.execute(sa.text(
            f"SELECT version_num FROM {names['executions_table']}_alembic"))).scalar())


async def _recoverable_index(engine: Any, executions: str, index: str = "recoverable"
                             ) -> str | None:
    """The definition of a partial index (the one of recoverable sagas unless ``index`` names
    another), with the table's name taken out (None where the dialect has no partial
    indexes)."""
    dialect = engine.dialect.name
    if dialect == "postgresql":
        query = "SELECT indexdef FROM pg_indexes WHERE indexname = :name"
    elif dialect == "sqlite":
        query = "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = :name"
    else:
        return None
    async with engine.connect() as conn:
        found = (await conn.execute(sa.text(query),
                                    {"name": f"ix_{executions}_{index}"})).scalar()
    assert found is not None
    return " ".join(str(found).replace(executions, "T").replace('"', "").split())


async def test_migrations_match_the_declared_schema(sql_storage: Any) -> None:
    names = _names()
    engine = sql_storage.engine
    await upgrade(engine, **names)
    declared = SagaTables(**names)
    ours = {declared.executions.name, declared.logs.name, declared.queues.name}

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
            await conn.execute(sa.text(f"DROP TABLE IF EXISTS {names['executions_table']}_alembic"))


@pytest.mark.parametrize("index", ["recoverable", "queued"])
async def test_the_migrated_partial_index_is_the_declared_one(
    sql_storage: Any, names: dict[str, str], index: str
) -> None:
    """compare_metadata does not compare index predicates: compare the definitions."""
    engine = sql_storage.engine
    await upgrade(engine, **names)
    declared = SagaTables(**_names())
    try:
        async with engine.begin() as conn:
            await conn.run_sync(declared.create_missing)
        migrated = await _recoverable_index(engine, names["executions_table"], index)
        assert migrated == await _recoverable_index(engine, declared.executions.name, index)
        expected = {"recoverable": ["WAITING", "queue IS NULL"],
                    "queued": ["priority DESC", "queue IS NOT NULL"]}[index]
        for part in expected if migrated is not None else []:
            assert part in migrated
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(declared.metadata.drop_all)


async def test_a_database_at_0001_with_a_saga_is_upgraded(
    sql_storage: Any, names: dict[str, str]
) -> None:
    engine = sql_storage.engine
    await upgrade(engine, "0001", **names)
    saga_id = await _saga_at_0001(engine, names)
    storage = SqlAlchemySagaStorage(engine, **names)

    # The new code on the old tables: a clear error naming the migrations to run.
    with pytest.raises(SagaStorageError, match="migrations"):
        await storage.get_saga(saga_id)
    async with storage.create_run() as run:  # the hot path's writes, straight to the driver
        with pytest.raises(SagaStorageError, match="migrations"):
            await run.start(uuid.uuid4(), "New", {}, fingerprint=None, lease_seconds=30)
    with pytest.raises(SagaStorageError, match=r"lacks the columns past_pivot, deadline_at, "
                       r"queue, concurrency_key, priority"):
        await storage.create_schema()

    await upgrade(engine, **names)
    assert await _revision(engine, names) == HEAD
    state = await storage.get_saga(saga_id)
    assert (state.status, state.context, state.version) == (SagaStatus.RUNNING, {"n": 1}, 2)
    assert (state.past_pivot, state.deadline_at) == (False, None)
    [entry] = await storage.get_step_history(saga_id)
    assert (entry.step_name, entry.status, entry.attempt) == (
        "Reserve", SagaStepStatus.COMPLETED, None)
    await storage.create_schema()  # complete now: nothing to do, nothing refused

    # The old saga runs on under the new code: waits, resumes, is marked past its pivot.
    [claimed] = await storage.claim_due("w", limit=5, lease_seconds=30)
    assert claimed.saga_id == saga_id
    async with storage.create_run() as run:
        run.adopt(claimed, 30)
        await run.log_step(saga_id, "Charge", "act", SagaStepStatus.RETRYING, "slow", attempt=1)
        await run.wait(saga_id, 0, release=True)
        await run.commit()
    [again] = await storage.claim_due("w", limit=5, lease_seconds=30)
    assert (again.saga_id, again.recovery_attempts) == (saga_id, claimed.recovery_attempts)
    async with storage.create_run() as run:
        run.adopt(again, 30)
        await run.log_step(saga_id, "Charge", "act", SagaStepStatus.COMPLETED, attempt=2)
        await run.pivot(saga_id)
        await run.update_status(saga_id, SagaStatus.COMPLETED)
        await run.commit()
    state = await storage.get_saga(saga_id)
    assert (state.status, state.past_pivot) == (SagaStatus.COMPLETED, True)
    assert [e.attempt for e in await storage.get_step_history(saga_id)] == [None, 1, 2]


async def test_the_downgrade_to_0001_reverses_0002(
    sql_storage: Any, names: dict[str, str]
) -> None:
    engine = sql_storage.engine
    await upgrade(engine, "0001", **names)
    before = await _schema(engine, names)
    index_before = await _recoverable_index(engine, names["executions_table"])
    await upgrade(engine, **names)
    assert await _schema(engine, names) != before
    await _downgrade(engine, "0001", names)
    assert await _revision(engine, names) == "0001"
    assert await _schema(engine, names) == before
    assert await _recoverable_index(engine, names["executions_table"]) == index_before
    await upgrade(engine, **names)  # and up again
    assert await _revision(engine, names) == HEAD


async def _schema(engine: Any, names: dict[str, str]) -> dict[str, Any]:
    """Each table's columns (name, type, nullable) and index names (None for a missing
    table)."""
    def read(conn: sa.Connection) -> dict[str, Any]:
        inspector = sa.inspect(conn)
        return {
            table: ([(c["name"], str(c["type"]), c["nullable"])
                     for c in inspector.get_columns(table)],
                    sorted(str(ix["name"]) for ix in inspector.get_indexes(table)))
            if inspector.has_table(table) else None
            for table in names.values()
        }

    async with engine.connect() as conn:
        return await conn.run_sync(read)


async def _saga_at_0001(engine: Any, names: dict[str, str]) -> uuid.UUID:
    """A RUNNING saga, version 2, with one log entry, written as sagakit 0001 wrote them (only
    the columns revision 0001 has)."""
    tables = SagaTables(**names)
    saga_id = uuid.uuid4()
    now = datetime.now(UTC)
    if engine.dialect.name != "postgresql":
        now = now.replace(tzinfo=None)
    context: Any = {"n": 1} if engine.dialect.name == "postgresql" else json.dumps({"n": 1})
    async with engine.begin() as conn:
        await conn.execute(sa.insert(tables.executions).values(
            saga_id=saga_id, name="Old", status="RUNNING", context=context, version=2,
            recovery_attempts=0, created_at=now, updated_at=now))
        await conn.execute(sa.insert(tables.logs).values(
            saga_id=saga_id, step_name="Reserve", action="act", status="COMPLETED",
            created_at=now))
    return saga_id


async def test_a_database_at_0002_with_a_saga_is_upgraded(
    sql_storage: Any, names: dict[str, str]
) -> None:
    engine = sql_storage.engine
    await upgrade(engine, "0002", **names)
    saga_id = await _saga_at_0001(engine, names)  # what 0001 wrote is valid at 0002 too
    storage = SqlAlchemySagaStorage(engine, **names)

    # The new code on the old tables: a clear error naming the migrations to run.
    with pytest.raises(SagaStorageError, match="migrations"):
        await storage.get_saga(saga_id)
    with pytest.raises(SagaStorageError, match="migrations"):
        await storage.claim_queued("w", "orders", limit=5, lease_seconds=30)
    with pytest.raises(SagaStorageError, match="migrations"):
        await storage.get_queues()
    with pytest.raises(SagaStorageError,
                       match=r"lacks the columns queue, concurrency_key, priority:"):
        await storage.create_schema()

    await upgrade(engine, **names)
    assert await _revision(engine, names) == HEAD
    state = await storage.get_saga(saga_id)
    assert (state.status, state.context, state.version) == (SagaStatus.RUNNING, {"n": 1}, 2)
    assert (state.queue, state.concurrency_key, state.priority) == (None, None, 0)
    await storage.create_schema()  # complete now: nothing to do, nothing refused

    # The old saga is still recovery's; queues work beside it.
    submitted = uuid.uuid4()
    assert await storage.submit(submitted, "New", {"m": 1}, queue="orders", priority=3)
    [claimed] = await storage.claim_due("w", limit=5, lease_seconds=30)
    assert claimed.saga_id == saga_id
    await storage.set_queue(QueueSettings("orders", concurrency=1))
    [queued] = await storage.claim_queued("w", "orders", limit=5, lease_seconds=30)
    assert (queued.saga_id, queued.queue, queued.priority) == (submitted, "orders", 3)
    assert await storage.queue_counts() == {"orders": {SagaStatus.RUNNING: 1}}


async def test_the_downgrade_to_0002_reverses_0003(
    sql_storage: Any, names: dict[str, str]
) -> None:
    engine = sql_storage.engine
    await upgrade(engine, "0002", **names)
    before = await _schema(engine, names)
    assert before[names["queues_table"]] is None
    index_before = await _recoverable_index(engine, names["executions_table"])
    await upgrade(engine, **names)
    storage = SqlAlchemySagaStorage(engine, **names)
    await storage.set_queue(QueueSettings("orders", concurrency=2))
    assert await storage.submit(uuid.uuid4(), "New", {}, queue="orders")
    assert await _schema(engine, names) != before
    await _downgrade(engine, "0002", names)
    assert await _revision(engine, names) == "0002"
    assert await _schema(engine, names) == before
    assert await _recoverable_index(engine, names["executions_table"]) == index_before
    await upgrade(engine, **names)  # and up again
    assert await _revision(engine, names) == HEAD


async def test_upgrade_twice_is_a_no_op(sql_storage: Any, names: dict[str, str]) -> None:
    await upgrade(sql_storage.engine, **names)
    await upgrade(sql_storage.engine, **names)
    assert await _revision(sql_storage.engine, names) == HEAD


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
         "-x", "logs_table=cli_logs", "-x", "queues_table=cli_queues", "upgrade", "head"],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    import sqlite3

    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"cli_ex", "cli_logs", "cli_queues", "cli_ex_alembic"} <= tables
