"""Storage faults reach callers as sagakit's own errors, dropped connections are replaced, and
data a database refuses fails the step that produced it instead of looping through recovery."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from sagakit import (
    RecoveryWorker,
    SagaSerializationError,
    SagaStatus,
    SagaStorageError,
    SagaStorageRejectedError,
    SagaStorageUnavailableError,
    recover_saga,
)
from sagakit.exceptions import SagaConcurrencyError, SagaNotFoundError
from sagakit.records import ContextJSON, SagaAction, SagaStepStatus
from sagakit.storage.pool import LeasedStart
from sagakit.storage.run import Checkpoint, PendingEntry
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.conftest import MYSQL_DSN, POSTGRES_DSN, TABLES
from tests.integration.sagas import OrderContext, OrderSaga, Recorder
from tests.integration.test_sql_faults import kill_connections, remember_mysql_connection_ids

pytestmark = pytest.mark.integration

SERVERS = {"postgres": POSTGRES_DSN, "mysql": MYSQL_DSN}
DOWN = {  # a port nothing listens on: connections are refused
    "postgres": "postgresql+asyncpg://postgres@127.0.0.1:9/test",
    "mysql": "mysql+asyncmy://root@127.0.0.1:9/test",
}


@pytest.fixture(autouse=True)
def _reset_recorder() -> None:
    Recorder.reset()


async def fresh_storage(backend: str, tmp_path: Any, **options: Any) -> SqlAlchemySagaStorage:
    """An empty storage on a real server, or on a SQLite file under ``tmp_path``."""
    url = SERVERS.get(backend, f"sqlite+aiosqlite:///{tmp_path}/sagas.db")
    storage = SqlAlchemySagaStorage.from_url(url, **options, **TABLES)
    await storage.create_schema()
    await storage.delete_all()
    return storage


class Killable:
    """A storage on a real server whose server-side connections a test can kill."""

    def __init__(self, backend: str, **options: Any) -> None:
        self.backend = backend
        self.app = f"sagakit-fault-{uuid.uuid4().hex[:8]}"
        kwargs: dict[str, Any] = dict(options)
        if backend == "postgres":
            kwargs["connect_args"] = {"server_settings": {"application_name": self.app}}
        self.storage = SqlAlchemySagaStorage.from_url(SERVERS[backend], **kwargs, **TABLES)
        self.mysql_ids = (remember_mysql_connection_ids(self.storage)
                          if backend == "mysql" else [])
        self.refusing = False

        @sa.event.listens_for(self.storage.engine.sync_engine, "do_connect")
        def _refuse(*_: Any) -> None:
            if self.refusing:  # the server as seen from here: down
                raise ConnectionRefusedError(111, "Connection refused (test)")

    async def kill(self) -> None:
        await kill_connections(SERVERS[self.backend], self.app, self.mysql_ids)
        self.mysql_ids.clear()


@pytest.fixture(params=["postgres", "mysql"])
async def killable(request: pytest.FixtureRequest) -> AsyncIterator[Killable]:
    target = Killable(request.param)
    await target.storage.create_schema()
    await target.storage.delete_all()
    try:
        yield target
    finally:
        await target.storage.close()


# -- dropped connections ---------------------------------------------------------------------


@pytest.mark.parametrize("group_commit", [False, True], ids=["plain", "group"])
@pytest.mark.parametrize("backend", ["postgres", "mysql"])
async def test_a_dropped_connection_is_replaced_and_the_saga_goes_on(
    backend: str, group_commit: bool,
) -> None:
    target = Killable(backend, group_commit=group_commit)
    await target.storage.create_schema()
    Recorder.hooks["Ship"] = target.kill  # every connection of the storage dies mid-step
    try:
        saga_id = uuid.uuid4()
        status = await OrderSaga().transaction(
            context=OrderContext("k"), storage=target.storage, saga_id=saga_id).run()
        assert status is SagaStatus.COMPLETED
        state = await target.storage.get_saga(saga_id)
        assert state.context["done"] == ["Reserve", "Charge", "Ship", "Notify", "Invoice"]
        assert Recorder.calls.count("act:Ship") == 1  # its checkpoint got through
        history = await target.storage.get_step_history(saga_id)
        assert [e.step_name for e in history] == ["Reserve", "Charge", "Ship", "Notify",
                                                  "Invoice"]
    finally:
        await target.storage.close()


async def test_a_start_on_pooled_connections_the_server_dropped_succeeds(
    killable: Killable,
) -> None:
    storage = killable.storage
    warm = await asyncio.gather(*(OrderSaga().transaction(
        context=OrderContext(f"w{i}"), storage=storage).run() for i in range(4)))
    assert set(warm) == {SagaStatus.COMPLETED}
    assert storage.engine.pool.checkedin() >= 1  # idle pooled connections...
    await killable.kill()  # ...that the server then drops (a restart, an idle timeout)
    statuses = await asyncio.gather(*(OrderSaga().transaction(
        context=OrderContext(f"n{i}"), storage=storage).run() for i in range(4)))
    assert set(statuses) == {SagaStatus.COMPLETED}
    assert len(await storage.list_sagas()) == 8


async def test_an_unreachable_database_raises_unavailable_and_the_saga_stays_recoverable(
    killable: Killable,
) -> None:
    storage = killable.storage

    async def outage() -> None:
        killable.refusing = True
        await killable.kill()

    Recorder.hooks["Ship"] = outage
    saga_id = uuid.uuid4()
    with pytest.raises(SagaStorageUnavailableError) as info:
        await OrderSaga().transaction(
            context=OrderContext("u"), storage=storage, saga_id=saga_id, lease_seconds=1).run()
    error = info.value
    assert (error.saga_id, error.saga_name, error.step_name) == (saga_id, "OrderSaga", "Ship")
    assert error.__cause__ is not None
    killable.refusing = False
    state = await storage.get_saga(saga_id)
    assert state.status is SagaStatus.RUNNING
    assert state.context["done"] == ["Reserve", "Charge"]  # the last checkpoint, intact
    Recorder.hooks.clear()
    await asyncio.sleep(1.2)  # the lease could not be released while the server was "down"
    assert await recover_saga(OrderSaga(), saga_id, storage=storage) is SagaStatus.COMPLETED
    assert Recorder.calls.count("act:Ship") == 2  # its completion was never checkpointed


@pytest.mark.parametrize("backend", ["postgres", "mysql", "sqlite"])
async def test_every_public_call_on_a_down_database_raises_storage_unavailable(
    backend: str, tmp_path: Any,
) -> None:
    url = DOWN.get(backend, f"sqlite+aiosqlite:///{tmp_path}/no/such/dir/sagas.db")
    storage = SqlAlchemySagaStorage.from_url(url, **TABLES)
    saga_id = uuid.uuid4()
    calls = {
        "create_schema": storage.create_schema(),
        "start": OrderSaga().transaction(context=OrderContext("d"), storage=storage).run(),
        "get_saga": storage.get_saga(saga_id),
        "history": storage.get_step_history(saga_id),
        "list": storage.list_sagas(),
        "due": storage.get_sagas_for_recovery(10),
        "claim_due": storage.claim_due("w", limit=5, lease_seconds=30),
        "recover": recover_saga(OrderSaga(), saga_id, storage=storage),
        "create_saga": storage.create_saga(saga_id, "OrderSaga", {"order_id": "x"}),
    }
    try:
        for name, call in calls.items():
            with pytest.raises(SagaStorageUnavailableError) as info:
                await call
            assert info.value.__cause__ is not None, name
            assert "unavailable" in str(info.value), name
    finally:
        await storage.close()
        await asyncio.sleep(0.2)  # aiosqlite's threads of the failed connects wind down


async def test_a_worker_outlives_an_outage_logging_its_start_and_end_once(
    killable: Killable, caplog: pytest.LogCaptureFixture,
) -> None:
    storage = killable.storage
    saga_id = uuid.uuid4()
    Recorder.fail.add("Ship")
    killable.refusing = True
    await killable.kill()
    worker = RecoveryWorker(storage, [OrderSaga], poll_interval=0.01)
    with caplog.at_level(logging.DEBUG, logger="sagakit"):
        task = asyncio.create_task(worker.run(install_signal_handlers=False))
        for _ in range(500):  # until several polls in a row have failed
            if worker.failed_polls >= 4:
                break
            await asyncio.sleep(0.01)
        assert worker.failed_polls >= 4
        assert not task.done()
        killable.refusing = False
        for _ in range(500):
            if worker.failed_polls == 0:
                break
            await asyncio.sleep(0.02)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2  # however many polls failed
    assert warnings[0].getMessage().startswith("polling for due sagas failed")
    assert warnings[1].getMessage().startswith("polling for due sagas works again")
    assert all(not r.exc_info for r in warnings)  # one line each, no traceback
    await storage.create_saga(saga_id, "OrderSaga", {"order_id": "o", "amount": 1, "done": []})
    for _ in range(200):
        if (await storage.get_saga(saga_id)).status is SagaStatus.FAILED:
            break
        await asyncio.sleep(0.05)
    worker.stop()
    await task
    assert (await storage.get_saga(saga_id)).status is SagaStatus.FAILED


# -- a write whose first try got through -----------------------------------------------------


async def test_a_checkpoint_already_written_is_recognised_not_reported_as_a_conflict(
    sql_storage: Any,
) -> None:
    storage: SqlAlchemySagaStorage = sql_storage
    start = LeasedStart(uuid.uuid4(), "OrderSaga", '{"n": 0}', None, "owner-1", 30.0)
    assert await storage.insert_one(start)
    assert await storage.insert_one(start, maybe_written=True)  # its own row: inserted
    other = LeasedStart(start.saga_id, "OrderSaga", "{}", None, "owner-2", 30.0)
    assert not await storage.insert_one(other, maybe_written=True)  # somebody else's row
    cp = Checkpoint(start.saga_id, context=ContextJSON(b'{"n": 1}'),
                    entries=[PendingEntry("Reserve", SagaAction.ACT, SagaStepStatus.COMPLETED,
                                          None, None)],
                    fence_owner="owner-1", fence_version=1, lease_seconds=30.0)
    assert await storage.write_one(cp, '{"n": 1}') == 2
    # The same checkpoint again, as after a connection lost while its commit went through:
    assert await storage.write_one(cp, '{"n": 1}', maybe_written=True) == 2
    with pytest.raises(SagaConcurrencyError):  # without that doubt it is a conflict
        await storage.write_one(cp, '{"n": 1}')
    stale = Checkpoint(start.saga_id, entries=list(cp.entries), fence_owner="owner-1",
                       fence_version=0, lease_seconds=30.0)
    with pytest.raises(SagaConcurrencyError):  # not this checkpoint's write: still a conflict
        await storage.write_one(stale, None, maybe_written=True)
    assert len(await storage.get_step_history(start.saga_id)) == 1


# -- data the database refuses ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgres", "mysql", "sqlite"])
async def test_a_value_the_database_refuses_fails_its_step_which_is_compensated_once(
    backend: str, tmp_path: Any,
) -> None:
    """A constraint of the user's own refuses a context value: a real refusal by the database
    (not a check of sagakit's), which must fail the step once, not loop through recovery."""
    storage = await fresh_storage(backend, tmp_path)
    table = TABLES["executions_table"]
    async with storage.engine.begin() as conn:
        if backend == "postgres":
            await conn.execute(sa.text(f"ALTER TABLE {table} ADD CONSTRAINT no_poison "
                                       "CHECK (context->>'order_id' <> 'poison')"))
        elif backend == "mysql":
            await conn.execute(sa.text(f"ALTER TABLE {table} ADD CONSTRAINT no_poison "
                                       "CHECK (JSON_VALUE(context, '$.order_id') <> 'poison')"))
        else:
            await conn.execute(sa.text(
                f"CREATE TRIGGER no_poison BEFORE UPDATE ON {table} "
                "WHEN json_extract(NEW.context, '$.order_id') = 'poison' "
                "BEGIN SELECT RAISE(ABORT, 'poison refused'); END"))

    ctx = OrderContext("fine")

    async def poison() -> None:
        ctx.order_id = "poison"

    Recorder.hooks["Ship"] = poison
    saga_id = uuid.uuid4()
    try:
        with pytest.raises(SagaStorageRejectedError) as info:
            await OrderSaga().transaction(context=ctx, storage=storage, saga_id=saga_id,
                                          compensation_retry_delay=0).run()
        assert info.value.step_name == "Ship"
        assert info.value.__cause__ is not None
        state = await storage.get_saga(saga_id)
        assert state.status is SagaStatus.FAILED
        assert state.context["order_id"] == "fine"  # the last context the database accepted
        assert Recorder.calls.count("act:Ship") == 1
        assert Recorder.calls[-2:] == ["compensate:Charge", "compensate:Reserve"]
        history = await storage.get_step_history(saga_id)
        failed = [e for e in history if e.status is SagaStepStatus.FAILED]
        assert [(e.step_name, e.action) for e in failed] == [("Ship", SagaAction.ACT)]
    finally:
        await storage.drop_schema()
        await storage.close()


async def test_a_context_over_mysqls_packet_limit_fails_its_step_before_it_is_sent() -> None:
    storage = SqlAlchemySagaStorage.from_url(MYSQL_DSN, max_context_bytes=64 * 1024 * 1024,
                                             **TABLES)
    await storage.create_schema()
    async with storage.engine.connect() as conn:
        limit = (await conn.execute(sa.text("SELECT @@max_allowed_packet"))).scalar_one()
    ctx = OrderContext("big")

    async def grow() -> None:
        ctx.order_id = "x" * (int(limit) + 1)

    Recorder.hooks["Charge"] = grow
    saga_id = uuid.uuid4()
    try:
        with pytest.raises(SagaSerializationError) as info:
            await OrderSaga().transaction(context=ctx, storage=storage, saga_id=saga_id,
                                          compensation_retry_delay=0).run()
        assert "max_allowed_packet" in str(info.value)
        assert info.value.step_name == "Charge"
        state = await storage.get_saga(saga_id)
        assert state.status is SagaStatus.FAILED
        assert state.context["order_id"] == "big"
        assert Recorder.calls.count("act:Charge") == 1
    finally:
        await storage.close()


# -- backpressure ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgres", "mysql", "sqlite"])
async def test_far_more_sagas_than_connections_wait_their_turn(
    backend: str, tmp_path: Any,
) -> None:
    storage = await fresh_storage(backend, tmp_path, pool_size=2, max_overflow=0,
                                  pool_timeout=1, acquire_timeout=120)
    try:
        statuses = await asyncio.gather(*(OrderSaga().transaction(
            context=OrderContext(f"f{i}"), storage=storage).run() for i in range(300)))
        assert statuses == [SagaStatus.COMPLETED] * 300
        assert storage.connections.gate is not None
        assert storage.connections.gate.in_use == 0
    finally:
        await storage.close()


@pytest.mark.parametrize("backend", ["postgres", "mysql", "sqlite"])
async def test_a_start_that_waits_too_long_for_a_connection_fails_cleanly(
    backend: str, tmp_path: Any,
) -> None:
    storage = await fresh_storage(backend, tmp_path, pool_size=1, max_overflow=0,
                                  acquire_timeout=0.2)
    saga_id = uuid.uuid4()
    gate = storage.connections.gate
    assert gate is not None
    try:
        await gate.enter(0)  # somebody holds the only connection for too long
        try:
            with pytest.raises(SagaStorageUnavailableError) as info:
                await OrderSaga().transaction(context=OrderContext("w"), storage=storage,
                                              saga_id=saga_id).run()
        finally:
            gate.leave()
        assert "acquire_timeout" in str(info.value)
        assert isinstance(info.value, SagaStorageError)
        assert Recorder.calls == []
        with pytest.raises(SagaNotFoundError):  # nothing was written
            await storage.get_saga(saga_id)
    finally:
        await storage.close()
