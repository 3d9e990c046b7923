"""Group commit: concurrent sagas share transactions, and a neighbour's failure stays its own."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from sagakit import SagaBusyError, SagaConcurrencyError, SagaLeaseLostError, SagaStatus
from sagakit.records import SagaAction, SagaStepStatus
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.conftest import TABLES
from tests.integration.sagas import OrderContext, OrderSaga, Recorder
from tests.integration.sqlcount import SqlCounter

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
    writes = 30 * (len(OrderSaga.steps) + 1)  # the start and a checkpoint per step
    assert 0 < grouped.group_commit.batches < writes
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


async def _start_many(storage: Any, saga_ids: list[Any], deadlines: list[Any] | None = None,
                      ) -> tuple[list[Any], list[Any]]:
    """Start runs of the given ids at the same moment (with the given deadlines, seconds);
    (scopes, results of start())."""
    scopes = [storage.create_run() for _ in saga_ids]
    runs = [await scope.__aenter__() for scope in scopes]
    deadlines = deadlines or [None] * len(saga_ids)
    results = await asyncio.gather(
        *(run.start(saga_id, "Grouped", {"i": i}, fingerprint=None, lease_seconds=30,
                    deadline_seconds=deadline)
          for i, (run, saga_id, deadline) in enumerate(zip(runs, saga_ids, deadlines,
                                                            strict=True))),
        return_exceptions=True,
    )
    return scopes, results


async def _close(scopes: list[Any]) -> None:
    for scope in scopes:
        await scope.__aexit__(None, None, None)


# SQLite writes each start at once: its inserts cannot be coalesced.
@pytest.mark.parametrize("sql_storage", ["postgres", "mysql"], indirect=True)
async def test_concurrent_starts_share_commits(grouped: Any) -> None:
    saga_ids = [uuid.uuid4() for _ in range(20)]
    counter = SqlCounter(grouped.engine)
    try:
        scopes, results = await _start_many(grouped, saga_ids)
    finally:
        await counter.aclose()
    # The first start finds the storage idle and is written at once, alone; the 19 that arrive
    # meanwhile go out together.
    assert counter.counts.transactions <= 3, counter.log
    assert [created for _, created in results] == [True] * 20
    for saga_id, (state, _) in zip(saga_ids, results, strict=True):
        stored = await grouped.get_saga(saga_id)
        assert (stored.status, stored.version, stored.context) == (SagaStatus.RUNNING, 1,
                                                                   state.context)
        assert stored.lease_owner == state.lease_owner is not None
    await _close(scopes)


@pytest.mark.parametrize("sql_storage", ["postgres", "mysql"], indirect=True)
async def test_a_start_of_an_existing_id_in_a_batch_claims_it_and_spares_its_neighbours(
    grouped: Any,
) -> None:
    existing = uuid.uuid4()
    await grouped.create_saga(existing, "Grouped", {"stored": True})
    saga_ids = [uuid.uuid4() for _ in range(6)]
    saga_ids[3] = existing
    scopes, results = await _start_many(grouped, saga_ids)
    for saga_id, (state, created) in zip(saga_ids, results, strict=True):
        assert created is (saga_id != existing)
        assert state.lease_owner is not None
        assert (await grouped.get_saga(saga_id)).lease_owner == state.lease_owner
    claimed = await grouped.get_saga(existing)
    assert (claimed.status, claimed.context) == (SagaStatus.RUNNING, {"stored": True})
    await _close(scopes)


@pytest.mark.parametrize("sql_storage", ["postgres", "mysql"], indirect=True)
async def test_two_starts_of_one_new_id_in_a_batch(grouped: Any) -> None:
    twice = uuid.uuid4()
    saga_ids = [uuid.uuid4(), twice, uuid.uuid4(), twice]
    scopes, results = await _start_many(grouped, saga_ids)
    assert [r[1] for r in results if not isinstance(r, BaseException)].count(True) == 3
    assert sum(isinstance(r, SagaBusyError) for r in results) == 1
    for saga_id in saga_ids:
        assert (await grouped.get_saga(saga_id)).status is SagaStatus.RUNNING
    await _close(scopes)


@pytest.mark.parametrize("sql_storage", ["postgres", "mysql"], indirect=True)
async def test_a_start_alone_is_written_at_once(grouped: Any) -> None:
    counter = SqlCounter(grouped.engine)
    try:
        scopes, results = await _start_many(grouped, [uuid.uuid4()])
    finally:
        await counter.aclose()
    assert results[0][1] is True
    assert counter.counts.transactions == 1
    assert grouped.group_commit.batches == 1
    await _close(scopes)


@pytest.mark.parametrize("sql_storage", ["postgres", "mysql"], indirect=True)
async def test_a_batch_holds_at_most_max_batch_bytes_of_contexts(grouped: Any) -> None:
    grouped.group_commit.max_batch_bytes = 1  # every context is larger: one write per batch
    counter = SqlCounter(grouped.engine)
    try:
        scopes, results = await _start_many(grouped, [uuid.uuid4() for _ in range(5)])
    finally:
        await counter.aclose()
    assert [created for _, created in results] == [True] * 5
    assert counter.counts.transactions == 5
    await _close(scopes)


@pytest.mark.parametrize("sql_storage", ["postgres", "mysql"], indirect=True)
async def test_a_cancelled_commit_does_not_disturb_its_batch(grouped: Any) -> None:
    started = [await _started(grouped) for _ in range(3)]
    runs = [run for _, run in started]
    for run in runs:
        await run.log_step(run.saga_id, "Step", SagaAction.ACT, SagaStepStatus.COMPLETED)
        await run.update_context(run.saga_id, {"n": 1})
    commits = [asyncio.create_task(run.commit()) for run in runs]
    await asyncio.sleep(0)  # the first is being written alone, the other two wait in the queue
    commits[1].cancel()
    results = await asyncio.gather(*commits, return_exceptions=True)
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], asyncio.CancelledError)
    for run in (runs[0], runs[2]):
        assert (await grouped.get_saga(run.saga_id)).context == {"n": 1}
    for scope, _ in started:
        await scope.__aexit__(None, None, None)


@pytest.mark.parametrize("sql_storage", ["postgres", "mysql"], indirect=True)
async def test_a_large_batch_is_written_in_parallel_parts(grouped: Any) -> None:
    grouped.group_commit.parallel, grouped.group_commit.min_part = 2, 4
    counter = SqlCounter(grouped.engine)
    try:
        # The first start is written alone; the 8 queued meanwhile make one batch, written as
        # two transactions of 4 at once.
        scopes, results = await _start_many(grouped, [uuid.uuid4() for _ in range(9)])
    finally:
        await counter.aclose()
    assert [created for _, created in results] == [True] * 9
    assert counter.counts.transactions == 3
    assert grouped.group_commit.batches == 3
    await _close(scopes)


async def test_forward_recovery_writes_share_batches(grouped: Any) -> None:
    """Deadlines, attempt numbers, waits (durable or not), clear_wait and the pivot mark go
    through the batch statements as through single writes, a fenced-out neighbour included
    (on MySQL/MariaDB that batch is written the exact way, rows locked and read first)."""
    saga_ids = [uuid.uuid4() for _ in range(8)]
    deadlines = [None if i % 2 else 100.0 + i for i in range(8)]
    scopes, results = await _start_many(grouped, saga_ids, deadlines)
    assert [created for _, created in results] == [True] * len(saga_ids)
    runs = [await scope.__aenter__() for scope in scopes]  # the same runs, entered before
    for i, run in enumerate(runs):
        await run.log_step(run.saga_id, "Ship", SagaAction.ACT, SagaStepStatus.RETRYING,
                           f"slow {i}", error_type="builtins.TimeoutError", attempt=i + 1)
        if i % 4 != 3:
            await run.wait(run.saga_id, 60, release=i % 4 == 0)
        if i % 4 == 2:
            await run.pivot(run.saga_id)
    before = grouped.group_commit.batches
    await asyncio.gather(*(run.commit() for run in runs))
    assert grouped.group_commit.batches - before < len(runs)
    for i, saga_id in enumerate(saga_ids):
        state = await grouped.get_saga(saga_id)
        assert state.created_at is not None
        if deadlines[i] is None:
            assert state.deadline_at is None
        else:
            assert state.deadline_at is not None
            assert abs((state.deadline_at - state.created_at).total_seconds() - deadlines[i]) < 0.01
        waits, releases = i % 4 != 3, i % 4 == 0
        assert state.status is (SagaStatus.WAITING if releases else SagaStatus.RUNNING)
        assert (state.lease_owner is None) is releases
        assert (state.next_attempt_at is not None) is waits
        assert state.past_pivot is (i % 4 == 2)
        [entry] = await grouped.get_step_history(saga_id)
        assert (entry.status, entry.attempt, entry.details) == (
            SagaStepStatus.RETRYING, i + 1, f"slow {i}")

    # The runs still leased clear their waits together; one of them was fenced out meanwhile.
    leased = [run for i, run in enumerate(runs) if i % 4 != 0]
    fenced = leased[1]  # not the first commit, which finds the storage idle and goes alone
    await grouped.update_context(fenced.saga_id, {"changed": "behind its back"})
    for run in leased:
        await run.log_step(run.saga_id, "Ship", SagaAction.ACT, SagaStepStatus.COMPLETED,
                           attempt=9)
        await run.clear_wait(run.saga_id)
    outcomes = await asyncio.gather(*(run.commit() for run in leased), return_exceptions=True)
    assert isinstance(outcomes[1], SagaConcurrencyError)
    assert outcomes[:1] + outcomes[2:] == [None] * (len(leased) - 1)
    assert (await grouped.get_saga(fenced.saga_id)).next_attempt_at is not None
    for run in leased[:1] + leased[2:]:
        state = await grouped.get_saga(run.saga_id)
        assert state.next_attempt_at is None
        assert [e.attempt for e in await grouped.get_step_history(run.saga_id)][-1] == 9
    await _close(scopes)
