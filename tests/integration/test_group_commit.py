"""Group commit: concurrent sagas share transactions, and a neighbour's failure stays its own."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from sagakit import SagaLeaseLostError, SagaStatus
from sagakit.records import SagaAction, SagaStepStatus
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.conftest import TABLES
from tests.integration.sagas import OrderContext, OrderSaga, Recorder

pytestmark = pytest.mark.integration


@pytest.fixture
async def grouped(sql_storage: Any) -> Any:
    storage = SqlAlchemySagaStorage(sql_storage.engine, group_commit=True, **TABLES)
    yield storage
    await storage.close()


async def test_concurrent_sagas_share_commits_and_all_complete(grouped: Any) -> None:
    Recorder.reset()
    saga = OrderSaga()
    transactions = [saga.transaction(context=OrderContext(f"g-{i}"), storage=grouped)
                    for i in range(30)]
    statuses = await asyncio.gather(*(t.run() for t in transactions))
    assert statuses == [SagaStatus.COMPLETED] * 30
    checkpoints = 30 * len(OrderSaga.steps)
    assert 0 < grouped.group_commit.batches < checkpoints
    for t in transactions:
        state = await grouped.get_saga(t.saga_id)
        assert state.version == len(OrderSaga.steps) + 1
        history = await grouped.get_step_history(t.saga_id)
        assert [e.step_name for e in history] == [s.__name__ for s in OrderSaga.steps]


async def _started(storage: Any, lease: float = 30.0) -> Any:
    scope = storage.create_run()
    run = await scope.__aenter__()
    await run.start(uuid.uuid4(), "Grouped", {"n": 0}, fingerprint=None, lease_seconds=lease)
    return scope, run


async def test_a_fenced_checkpoint_fails_only_its_own_saga(grouped: Any) -> None:
    (scope1, stale), (scope2, healthy) = await _started(grouped, 0.05), await _started(grouped)
    scope0, busy = await _started(grouped)
    await asyncio.sleep(0.3)
    async with grouped.create_run() as thief:
        await thief.claim(stale.saga_id, lease_seconds=30)
        for run in (busy, stale, healthy):
            await run.log_step(run.saga_id, "Step", SagaAction.ACT, SagaStepStatus.COMPLETED)
            await run.update_context(run.saga_id, {"n": 1})
        before = grouped.group_commit.batches
        # The first commit finds the storage idle and is written at once, alone; the two that
        # arrive meanwhile queue up and go out together, in one batch.
        results = await asyncio.gather(busy.commit(), stale.commit(), healthy.commit(),
                                       return_exceptions=True)
        assert grouped.group_commit.batches == before + 2
    assert results[0] is None
    assert isinstance(results[1], SagaLeaseLostError)
    assert results[2] is None
    assert (await grouped.get_saga(stale.saga_id)).context == {"n": 0}
    assert await grouped.get_step_history(stale.saga_id) == []
    assert (await grouped.get_saga(healthy.saga_id)).context == {"n": 1}
    assert len(await grouped.get_step_history(healthy.saga_id)) == 1
    for scope in (scope0, scope1, scope2):
        await scope.__aexit__(None, None, None)


# SQLite does not enforce VARCHAR lengths, so it has nothing to reject here.
@pytest.mark.parametrize("sql_storage", ["postgres", "mysql"], indirect=True)
async def test_a_checkpoint_the_database_rejects_fails_only_its_own_saga(grouped: Any) -> None:
    (scope1, bad), (scope2, good) = await _started(grouped), await _started(grouped)
    await bad.log_step(bad.saga_id, "x" * 300, SagaAction.ACT, SagaStepStatus.COMPLETED)
    await good.log_step(good.saga_id, "Fine", SagaAction.ACT, SagaStepStatus.COMPLETED)
    results = await asyncio.gather(bad.commit(), good.commit(), return_exceptions=True)
    assert isinstance(results[0], Exception)
    assert results[1] is None
    assert await grouped.get_step_history(bad.saga_id) == []
    assert [e.step_name for e in await grouped.get_step_history(good.saga_id)] == ["Fine"]
    for scope in (scope1, scope2):
        await scope.__aexit__(None, None, None)
