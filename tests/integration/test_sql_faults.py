"""What the SQL storage holds while steps run, and how it fails: bad contexts, lost
connections, locks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import struct
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from sagakit import (
    Saga,
    SagaSerializationError,
    SagaStatus,
    SagaStepHandler,
)
from sagakit.exceptions import SagaNotFoundError
from sagakit.records import SagaStepStatus
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.conftest import MYSQL_DSN, POSTGRES_DSN, TABLES
from tests.integration.sagas import OrderContext, OrderSaga, Recorder

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _reset_recorder() -> None:
    Recorder.reset()


async def test_no_connection_is_held_while_a_step_runs(sql_storage: Any) -> None:
    seen: list[int] = []

    async def look() -> None:
        seen.append(sql_storage.engine.pool.checkedout())

    for step in OrderSaga.steps:
        Recorder.hooks[step.__name__] = look
    status = await OrderSaga().transaction(context=OrderContext("h-1"), storage=sql_storage).run()
    assert status is SagaStatus.COMPLETED
    assert seen == [0] * len(OrderSaga.steps)


async def test_postgres_has_no_open_transaction_of_ours_during_a_step() -> None:
    app = f"sagakit-held-{uuid.uuid4().hex[:8]}"
    storage = SqlAlchemySagaStorage.from_url(
        POSTGRES_DSN, connect_args={"server_settings": {"application_name": app}}, **TABLES
    )
    observer = SqlAlchemySagaStorage.from_url(POSTGRES_DSN, **TABLES)
    await storage.create_schema()
    states: list[list[str]] = []

    async def look() -> None:
        async with observer.engine.connect() as conn:
            rows = await conn.execute(
                sa.text("SELECT state FROM pg_stat_activity WHERE application_name = :app"),
                {"app": app},
            )
            states.append([r[0] for r in rows])

    for step in OrderSaga.steps:
        Recorder.hooks[step.__name__] = look
    try:
        status = await OrderSaga().transaction(context=OrderContext("h-2"), storage=storage).run()
    finally:
        await storage.close()
        await observer.close()
    assert status is SagaStatus.COMPLETED
    assert len(states) == len(OrderSaga.steps)
    for during_step in states:  # pooled connections may idle, none is in a transaction
        assert all(state == "idle" for state in during_step), states


async def test_an_unserialisable_context_is_refused_before_anything_is_written(
    sql_storage: Any,
) -> None:
    @dataclasses.dataclass
    class Bad(OrderContext):
        blob: Any = None

    class BadSaga(Saga[Bad]):
        steps = list(OrderSaga.steps)

    saga_id = uuid.uuid4()
    with pytest.raises(SagaSerializationError) as info:
        BadSaga().transaction(context=Bad("x", blob=object()), storage=sql_storage, saga_id=saga_id)
    assert info.value.field == "blob"
    assert "BadSaga" in str(info.value)
    with pytest.raises(SagaNotFoundError):
        await sql_storage.get_saga(saga_id)


async def test_a_context_too_large_for_the_storage_fails_the_step_and_compensates(
    sql_storage: Any, tmp_path: Any
) -> None:
    small = SqlAlchemySagaStorage(sql_storage.engine, max_context_bytes=2000, **TABLES)

    async def grow() -> None:
        context = current_context.pop()
        context.order_id = "x" * 5000

    current_context: list[OrderContext] = []

    class Capture(SagaStepHandler[OrderContext, None]):
        async def act(self, context: OrderContext) -> None:
            current_context.append(context)

        async def compensate(self, context: OrderContext) -> None:
            Recorder.calls.append("compensate:Capture")

    class GrowSaga(Saga[OrderContext]):
        name = "GrowSaga"
        steps = [Capture, *OrderSaga.steps]

    Recorder.hooks["Charge"] = grow
    saga_id = uuid.uuid4()
    with pytest.raises(SagaSerializationError) as info:
        await GrowSaga().transaction(
            context=OrderContext("g"), storage=small, saga_id=saga_id, compensation_retry_delay=0
        ).run()
    assert info.value.step_name == "Charge"
    assert "max_context_bytes" in str(info.value)
    state = await small.get_saga(saga_id)
    assert state.status is SagaStatus.FAILED
    assert state.context["order_id"] == "g"  # the last context the storage accepted
    assert Recorder.calls[-2:] == ["compensate:Reserve", "compensate:Capture"]


async def kill_connections(url: str, app_marker: str, mysql_ids: list[int]) -> None:
    """Terminate the server connections of the storage under test (and only those), from
    another connection."""
    admin = SqlAlchemySagaStorage.from_url(url)
    try:
        async with admin.engine.connect() as conn:
            if admin.dialect.is_postgres:
                await conn.execute(sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :app"), {"app": app_marker})
            else:
                for pid in mysql_ids:
                    await conn.execute(sa.text(f"KILL {int(pid)}"))
    finally:
        await admin.close()


def remember_mysql_connection_ids(storage: SqlAlchemySagaStorage) -> list[int]:
    ids: list[int] = []

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT CONNECTION_ID()")
        ids.append(int(cursor.fetchone()[0]))
        cursor.close()

    sa.event.listen(storage.engine.sync_engine, "connect", on_connect)
    return ids


@pytest.mark.parametrize("url", [POSTGRES_DSN, MYSQL_DSN], ids=["postgres", "mysql"])
async def test_read_for_update_locks_the_row_until_the_run_commits(url: str) -> None:
    storage = SqlAlchemySagaStorage.from_url(url, **TABLES)
    await storage.create_schema()
    saga_id = uuid.uuid4()
    await storage.create_saga(saga_id, "Locked", {"n": 1})
    try:
        async with storage.create_run() as run:
            status, context, version = await run.load_saga_state(saga_id, read_for_update=True)
            assert (status, context, version) == (SagaStatus.PENDING, {"n": 1}, 1)
            other = asyncio.create_task(storage.update_context(saga_id, {"n": 3}))
            await asyncio.sleep(0.3)
            assert not other.done()  # blocked by the row lock
            await run.update_context(saga_id, {"n": 2}, current_version=version)
            await run.commit()
            await other
        assert (await storage.load_saga_state(saga_id))[1:] == ({"n": 3}, 3)
    finally:
        await storage.close()


@pytest.mark.parametrize("group_commit", [False, True], ids=["plain", "group"])
async def test_a_checkpoint_stays_atomic_on_an_autocommit_mysql_engine(group_commit: bool) -> None:
    storage = SqlAlchemySagaStorage.from_url(MYSQL_DSN, isolation_level="AUTOCOMMIT",
                                             group_commit=group_commit, **TABLES)
    await storage.create_schema()
    saga_id = uuid.uuid4()
    try:
        async with storage.create_run() as run:
            await run.start(saga_id, "Atomic", {"n": 0}, fingerprint=None, lease_seconds=30)
            await run.update_context(saga_id, {"n": 1})
            # VARCHAR(255): the log insert fails, in the same query as the row update
            await run.log_step(saga_id, "x" * 300, "act", SagaStepStatus.COMPLETED)
            with pytest.raises(Exception, match="too long"):
                await run.commit()
        state = await storage.get_saga(saga_id)
        assert (state.context, state.version) == ({"n": 0}, 1)  # the update was rolled back
        assert await storage.get_step_history(saga_id) == []
    finally:
        await storage.close()


@pytest.mark.parametrize("group_commit", [False, True], ids=["plain", "group"])
async def test_a_mysql_checkpoint_whose_client_vanishes_mid_query_is_written_whole_or_not(
    group_commit: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client's connection reset right after a checkpoint's query went out (a SIGKILL, a
    link cut): the server runs the statements on, through the COMMIT, without anyone reading
    their results. The saga's row and its log entries are written together or not at all
    (relying on ROW_COUNT() after the UPDATE, the UPDATE was committed without its entries)."""
    from sagakit.storage import mysql

    real = mysql._execute
    yields = 0

    async def vanishing(raw: Any, sql: str) -> list[Any]:
        if "UPDATE" not in sql:
            return await real(raw, sql)
        sent = asyncio.ensure_future(real(raw, sql))
        for _ in range(yields):
            await asyncio.sleep(0)
        transport = raw._transport
        transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()  # an RST: the server's reads and writes fail from here on
        return await sent

    storage = SqlAlchemySagaStorage.from_url(MYSQL_DSN, group_commit=group_commit, **TABLES)
    await storage.create_schema()
    outcomes: list[tuple[int, int]] = []
    try:
        for round_ in range(24):
            saga_id = uuid.uuid4()
            yields = round_ % 4
            try:
                async with storage.create_run() as run:
                    await run.start(saga_id, "Vanishing", {"n": 0}, fingerprint=None,
                                    lease_seconds=30)
                    monkeypatch.setattr(mysql, "_execute", vanishing)
                    await run.update_context(saga_id, {"n": 1})
                    await run.log_step(saga_id, "Step", "act", SagaStepStatus.COMPLETED)
                    with contextlib.suppress(Exception):
                        await run.commit()
            finally:
                monkeypatch.setattr(mysql, "_execute", real)
            await asyncio.sleep(0.1)  # the server finishes what it received
            state = await storage.get_saga(saga_id)
            entries = len(await storage.get_step_history(saga_id))
            outcomes.append((state.context["n"], entries))
    finally:
        await storage.close()
    assert set(outcomes) <= {(0, 0), (1, 1)}, outcomes
