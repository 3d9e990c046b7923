"""Table names against the identifier limit, and create_schema completing a half-built schema,
on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine

from sagakit import SagaStatus
from sagakit.migrations import upgrade
from sagakit.queue import QueueSettings
from sagakit.storage.schema import MAX_IDENTIFIER_LENGTH, SagaTables
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.conftest import MYSQL_DSN, POSTGRES_DSN
from tests.integration.sagas import OrderContext, OrderSaga, Recorder

pytestmark = pytest.mark.integration


def _name(prefix: str, length: int) -> str:
    """A table name of exactly ``length`` characters, unique to this test process and call."""
    base = f"{prefix}{os.getpid()}_{uuid.uuid4().hex[:6]}_"
    return base + "x" * (length - len(base))


def _longest() -> dict[str, str]:
    # ix_<executions>_status_updated and ix_<logs>_saga_id are the longest derived names; the
    # queues table has no index of its own
    return {"executions_table": _name("e", MAX_IDENTIFIER_LENGTH - len("ix__status_updated")),
            "logs_table": _name("l", MAX_IDENTIFIER_LENGTH - len("ix__saga_id")),
            "queues_table": _name("q", MAX_IDENTIFIER_LENGTH)}


def _expected(storage: SqlAlchemySagaStorage) -> dict[str, set[str]]:
    """The indexes the declared schema has on this backend (no partial index on MySQL)."""
    partial = storage.dialect.name in ("postgresql", "sqlite")
    return {
        table.name: {str(ix.name) for ix in table.indexes
                     if partial or not str(ix.name).endswith("_recoverable")}
        for table in (storage.tables.executions, storage.tables.logs)
    }


async def _indexes(storage: SqlAlchemySagaStorage) -> dict[str, set[str]]:
    names = [storage.tables.executions.name, storage.tables.logs.name]

    def read(conn: sa.Connection) -> dict[str, set[str]]:
        inspector = sa.inspect(conn)
        return {name: {str(ix["name"]) for ix in inspector.get_indexes(name)}
                for name in names if inspector.has_table(name)}

    async with storage.engine.connect() as conn:
        return await conn.run_sync(read)


async def _ddl_during(storage: SqlAlchemySagaStorage, action: Callable[[], Any]) -> list[str]:
    """The schema-changing statements sent while ``action()`` runs."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(("CREATE", "DROP", "ALTER")):
            seen.append(statement)

    event.listen(storage.engine.sync_engine, "before_cursor_execute", record)
    try:
        await action()
    finally:
        event.remove(storage.engine.sync_engine, "before_cursor_execute", record)
    return seen


@pytest.fixture
async def fresh(sql_storage: SqlAlchemySagaStorage) -> AsyncIterator[SqlAlchemySagaStorage]:
    """A storage on the backend's engine with tables of its own (dropped afterwards)."""
    names = {"executions_table": _name("cs", 24), "logs_table": _name("cl", 24),
             "queues_table": _name("cq", 24)}
    storage = SqlAlchemySagaStorage(sql_storage.engine, **names)
    try:
        yield storage
    finally:
        await storage.drop_schema()
        await storage.close()


# -- table names --------------------------------------------------------------------------------


async def test_the_longest_accepted_names_work_end_to_end(sql_storage: Any) -> None:
    names = _longest()
    assert len(names["executions_table"]) == 45
    assert len(names["logs_table"]) == 52
    storage = SqlAlchemySagaStorage(sql_storage.engine, **names)
    Recorder.reset()
    try:
        await storage.create_schema()
        indexes = await _indexes(storage)
        assert indexes == _expected(storage)
        longest = max((name for found in indexes.values() for name in found), key=len)
        assert len(longest) == MAX_IDENTIFIER_LENGTH  # stored whole, not truncated
        transaction = OrderSaga().transaction(context=OrderContext("long"), storage=storage)
        assert await transaction.run() is SagaStatus.COMPLETED
        state = await storage.get_saga(transaction.saga_id)
        assert state.status is SagaStatus.COMPLETED
        assert len(await storage.get_step_history(transaction.saga_id)) == len(OrderSaga.steps)
        assert len(names["queues_table"]) == MAX_IDENTIFIER_LENGTH
        await storage.set_queue(QueueSettings("orders", concurrency=1))
        assert await storage.get_queues() == [QueueSettings("orders", concurrency=1)]
    finally:
        await storage.drop_schema()
        await storage.close()


@pytest.mark.parametrize("url", [POSTGRES_DSN, MYSQL_DSN, "sqlite+aiosqlite:///never.db"])
@pytest.mark.parametrize(("option", "length", "derived", "most"), [
    ("executions_table", 46, "_status_updated", 45),
    ("logs_table", 53, "_saga_id", 52),
])
async def test_one_character_more_is_refused_before_any_connection(
    url: str, option: str, length: int, derived: str, most: int
) -> None:
    name = _name("n", length)
    engine = create_async_engine(url)
    connected: list[Any] = []
    event.listen(engine.sync_engine, "connect", lambda *args: connected.append(args))
    message = (rf"{option} '{name}' is too long \({length} characters\): its index name "
               rf"'ix_{name}{derived}' would have 64 characters, over the 63-character "
               rf"identifier limit; {option} may have at most {most} characters")
    try:
        with pytest.raises(ValueError, match=message):
            SqlAlchemySagaStorage(engine, **{option: name})
        with pytest.raises(ValueError, match=message):
            SqlAlchemySagaStorage.from_url(url, **{option: name})
        with pytest.raises(ValueError, match=message):
            SagaTables(**{option: name})
        with pytest.raises(ValueError, match=message):
            await upgrade(engine, **{option: name})
        assert connected == []
    finally:
        await engine.dispose()


def test_the_tables_need_different_names() -> None:
    with pytest.raises(ValueError, match="executions_table and logs_table are both 'same'"):
        SagaTables("same", "same")
    with pytest.raises(ValueError, match="logs_table and queues_table are both 'same'"):
        SagaTables("ex", "same", queues_table="same")
    with pytest.raises(ValueError, match="executions_table and queues_table are both 'ex'"):
        SqlAlchemySagaStorage.from_url("sqlite+aiosqlite:///never.db", executions_table="ex",
                                       queues_table="ex")


@pytest.mark.parametrize("name", ["q" * 64, "1queue", "saga-queues", ""])
def test_a_queues_table_name_that_is_no_identifier_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid table name"):
        SagaTables(queues_table=name)
    with pytest.raises(ValueError, match="invalid table name"):
        SqlAlchemySagaStorage.from_url("sqlite+aiosqlite:///never.db", queues_table=name)


# -- create_schema completes what is missing ----------------------------------------------------


async def test_create_schema_adds_an_index_that_is_missing(fresh: SqlAlchemySagaStorage) -> None:
    await fresh.create_schema()
    expected = _expected(fresh)
    assert await _indexes(fresh) == expected
    missing = next(ix for ix in fresh.tables.executions.indexes
                   if str(ix.name).endswith("_name_status"))
    async with fresh.engine.begin() as conn:
        await conn.run_sync(missing.drop)
    assert str(missing.name) not in (await _indexes(fresh))[fresh.tables.executions.name]

    created = await _ddl_during(fresh, fresh.create_schema)
    assert len(created) == 1
    assert str(missing.name) in created[0]
    assert await _indexes(fresh) == expected
    assert await _ddl_during(fresh, fresh.create_schema) == []  # the third run changes nothing
    assert await _indexes(fresh) == expected


async def test_create_schema_adds_every_index_of_a_bare_table(fresh: SqlAlchemySagaStorage) -> None:
    # What an interrupted creation leaves on MySQL/MariaDB, which commit each CREATE at once.
    await fresh.create_schema()
    async with fresh.engine.begin() as conn:
        for index in fresh.tables.executions.indexes:
            await conn.run_sync(index.drop, checkfirst=True)
    assert (await _indexes(fresh))[fresh.tables.executions.name] == set()
    await fresh.create_schema()
    assert await _indexes(fresh) == _expected(fresh)
    assert await _ddl_during(fresh, fresh.create_schema) == []


async def test_create_schema_adds_a_missing_table(fresh: SqlAlchemySagaStorage) -> None:
    await fresh.create_schema()
    async with fresh.engine.begin() as conn:
        await conn.run_sync(fresh.tables.logs.drop)
    assert fresh.tables.logs.name not in await _indexes(fresh)

    await fresh.create_schema()
    assert await _indexes(fresh) == _expected(fresh)
    assert await _ddl_during(fresh, fresh.create_schema) == []
    Recorder.reset()
    transaction = OrderSaga().transaction(context=OrderContext("again"), storage=fresh)
    assert await transaction.run() is SagaStatus.COMPLETED
    assert len(await fresh.get_step_history(transaction.saga_id)) == len(OrderSaga.steps)


async def test_create_schema_on_an_empty_database_then_again(fresh: SqlAlchemySagaStorage) -> None:
    created = await _ddl_during(fresh, fresh.create_schema)
    assert created  # the tables and their indexes
    assert await _indexes(fresh) == _expected(fresh)
    assert await _ddl_during(fresh, fresh.create_schema) == []
