"""SagaTransaction: ordered steps, results, compensation, checkpoints and starting by id."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from sagakit import (
    MemorySagaStorage,
    SagaBusyError,
    SagaDefinitionError,
    SagaParkedError,
    SagaStatus,
    SagaStepResult,
)
from tests.unit.support import (
    Crash,
    Ctx,
    FourStepSaga,
    Gate,
    OneStepSaga,
    Snapshots,
    StepA,
    StepB,
    StepC,
    ThreeStepSaga,
    drive,
    history,
    state,
    transaction,
)

# -- happy path ----------------------------------------------------------------------------------


async def test_steps_run_in_order_and_yield_one_result_each(storage, script):
    saga_id = uuid.uuid4()
    results = await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    assert script.acts() == ["StepA", "StepB", "StepC"]
    assert script.compensations() == []
    assert [r.step_type for r in results] == [StepA, StepB, StepC]
    assert all(isinstance(r, SagaStepResult) for r in results)
    assert [r.response for r in results] == ["StepA-done", "StepB-done", "StepC-done"]
    assert [r.step_name for r in results] == ["StepA", "StepB", "StepC"]
    assert {r.saga_id for r in results} == {saga_id}
    row = await state(storage, saga_id)
    assert row.status is SagaStatus.COMPLETED
    assert row.context["trail"] == ["StepA", "StepB", "StepC"]
    assert row.lease_owner is None


async def test_a_bare_return_value_becomes_the_response(storage, script):
    class Bare(StepA):
        async def act(self, context):
            await super().act(context)
            return {"bare": True}

    class BareSaga(OneStepSaga):
        steps = [Bare]

    [result] = await drive(transaction(BareSaga(), script, storage))
    assert result.step_type is Bare
    assert result.response == {"bare": True}
    assert result.step_result == {"bare": True}


@pytest.mark.parametrize("saga", [OneStepSaga(), ThreeStepSaga(), FourStepSaga()])
async def test_happy_path_writes_one_checkpoint_per_step_plus_the_start(storage, script, saga):
    saga_id = uuid.uuid4()
    await drive(transaction(saga, script, storage, saga_id=saga_id))
    assert (await state(storage, saga_id)).version == len(saga.steps) + 1


async def test_running_row_is_durable_before_the_first_act_and_each_step_is_a_checkpoint(
    storage, script
):
    saga_id = uuid.uuid4()
    seen = Snapshots(storage, saga_id)
    for step in ("StepA", "StepB", "StepC"):
        script.hook(step, "act", seen)
    await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    assert seen.taken == [
        ("RUNNING", 1, []),
        ("RUNNING", 2, [("StepA", "act", "COMPLETED")]),
        ("RUNNING", 3, [("StepA", "act", "COMPLETED"), ("StepB", "act", "COMPLETED")]),
    ]


async def test_each_result_is_yielded_after_its_checkpoint(storage, script):
    saga_id = uuid.uuid4()
    txn = transaction(ThreeStepSaga(), script, storage, saga_id=saga_id)
    seen = []
    async with txn:
        async for result in txn:
            row = await state(storage, saga_id)
            seen.append((result.step_name, row.version, row.status.value))
    assert seen == [("StepA", 2, "RUNNING"), ("StepB", 3, "RUNNING"), ("StepC", 4, "COMPLETED")]


async def test_run_returns_the_final_status(storage, script):
    txn = transaction(ThreeStepSaga(), script, storage)
    assert await txn.run() is SagaStatus.COMPLETED
    assert txn.status is SagaStatus.COMPLETED


async def test_without_a_storage_a_fresh_memory_storage_is_used(script):
    txn = ThreeStepSaga().transaction(context=Ctx(), container=script.container)
    assert await txn.run() is SagaStatus.COMPLETED
    assert isinstance(txn.storage, MemorySagaStorage)
    assert (await txn.storage.get_saga(txn.saga_id)).status is SagaStatus.COMPLETED


# -- failure and compensation --------------------------------------------------------------------


async def test_failure_compensates_completed_steps_in_reverse_and_reraises(storage, script):
    boom = RuntimeError("card declined")
    script.fail("StepC", "act", boom)
    saga_id = uuid.uuid4()
    results: list[Any] = []
    txn = transaction(FourStepSaga(), script, storage, saga_id=saga_id)
    with pytest.raises(RuntimeError) as caught:
        await drive(txn, into=results)
    assert caught.value is boom
    assert [r.step_name for r in results] == ["StepA", "StepB"]
    assert script.calls == [
        ("StepA", "act"), ("StepB", "act"), ("StepC", "act"),
        ("StepB", "compensate"), ("StepA", "compensate"),
    ]
    row = await state(storage, saga_id)
    assert row.status is SagaStatus.FAILED
    assert row.lease_owner is None
    assert txn.status is SagaStatus.FAILED
    assert await history(storage, saga_id) == [
        ("StepA", "act", "COMPLETED"),
        ("StepB", "act", "COMPLETED"),
        ("StepC", "act", "FAILED"),
        ("StepB", "compensate", "COMPENSATED"),
        ("StepA", "compensate", "COMPENSATED"),
    ]


async def test_failed_step_log_records_the_error(storage, script):
    script.fail("StepB", "act", ValueError("bad sku"))
    saga_id = uuid.uuid4()
    with pytest.raises(ValueError, match="bad sku"):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    failed = next(e for e in await storage.get_step_history(saga_id) if e.step_name == "StepB")
    assert failed.error_type == "ValueError"
    assert "bad sku" in (failed.details or "")


@pytest.mark.parametrize("completed", [0, 1, 2, 3])
async def test_failure_after_k_steps_writes_2k_plus_2_checkpoints(storage, script, completed):
    failing = ["StepA", "StepB", "StepC", "StepD"][completed]
    script.fail(failing, "act", RuntimeError("boom"))
    saga_id = uuid.uuid4()
    with pytest.raises(RuntimeError):
        await drive(transaction(FourStepSaga(), script, storage, saga_id=saga_id))
    row = await state(storage, saga_id)
    assert row.status is SagaStatus.FAILED
    assert row.version == 2 * completed + 2


async def test_failure_and_compensating_are_durable_before_the_first_compensate(storage, script):
    saga_id = uuid.uuid4()
    script.fail("StepC", "act", RuntimeError("boom"))
    seen = Snapshots(storage, saga_id)
    script.hook("StepB", "compensate", seen)
    script.hook("StepA", "compensate", seen)
    with pytest.raises(RuntimeError):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    forward = [
        ("StepA", "act", "COMPLETED"), ("StepB", "act", "COMPLETED"), ("StepC", "act", "FAILED"),
    ]
    assert seen.taken == [
        ("COMPENSATING", 4, forward),
        ("COMPENSATING", 5, [*forward, ("StepB", "compensate", "COMPENSATED")]),
    ]
    assert (await state(storage, saga_id)).version == 6


async def test_context_changes_of_a_failed_step_reach_the_compensations(storage, script):
    async def scribble(handler, context):
        context.trail.append("half-done")

    script.hook("StepB", "act", scribble)
    script.fail("StepB", "act", RuntimeError("boom"))
    seen = []

    async def look(handler, context):
        seen.append(list(context.trail))

    script.hook("StepA", "compensate", look)
    with pytest.raises(RuntimeError):
        await drive(transaction(ThreeStepSaga(), script, storage))
    assert seen == [["StepA", "half-done"]]


# -- starting with an existing saga id -----------------------------------------------------------


async def test_a_terminal_saga_id_runs_nothing_and_writes_nothing(storage, script):
    saga_id = uuid.uuid4()
    await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    before = await state(storage, saga_id)
    txn = transaction(ThreeStepSaga(), script, storage, saga_id=saga_id)
    assert await drive(txn) == []
    assert script.count("StepA", "act") == 1
    assert await state(storage, saga_id) == before
    assert txn.status is SagaStatus.COMPLETED
    assert txn.resumed


async def test_a_failed_saga_id_runs_nothing_and_writes_nothing(storage, script):
    saga_id = uuid.uuid4()
    script.fail("StepB", "act", RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    before = await state(storage, saga_id)
    calls = list(script.calls)
    assert await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id)) == []
    assert script.calls == calls
    assert await state(storage, saga_id) == before


async def test_an_existing_saga_resumes_with_its_stored_context(storage, script):
    saga_id = uuid.uuid4()
    script.fail("StepB", "act", Crash())
    with pytest.raises(Crash):
        await drive(transaction(ThreeStepSaga(), script, storage, Ctx("stored"), saga_id=saga_id))
    txn = transaction(ThreeStepSaga(), script, storage, Ctx("ignored"), saga_id=saga_id)
    results = await drive(txn)
    assert [r.step_name for r in results] == ["StepB", "StepC"]
    assert script.acts() == ["StepA", "StepB", "StepB", "StepC"]
    assert txn.context.order_id == "stored"
    assert txn.context.trail == ["StepA", "StepB", "StepC"]
    row = await state(storage, saga_id)
    assert row.status is SagaStatus.COMPLETED
    assert row.context["order_id"] == "stored"


async def test_a_saga_leased_by_a_live_run_is_busy_and_nothing_is_written(storage, script):
    saga_id = uuid.uuid4()
    gate = Gate()
    script.hook("StepB", "act", gate)
    first = asyncio.create_task(
        drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    )
    await gate.entered.wait()
    before = await state(storage, saga_id)
    with pytest.raises(SagaBusyError) as caught:
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    assert caught.value.saga_id == saga_id
    assert await state(storage, saga_id) == before
    gate.release.set()
    await first
    assert script.acts() == ["StepA", "StepB", "StepC"]


async def test_two_simultaneous_starts_with_one_new_id_run_it_once(storage, script):
    saga_id = uuid.uuid4()
    outcomes = await asyncio.gather(
        drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id)),
        drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id)),
        return_exceptions=True,
    )
    ran = [o for o in outcomes if isinstance(o, list) and o]
    assert len(ran) == 1
    others = [o for o in outcomes if o is not ran[0]]
    assert all(isinstance(o, SagaBusyError) or o == [] for o in others)
    assert script.acts() == ["StepA", "StepB", "StepC"]


async def test_a_parked_saga_id_raises_and_writes_nothing(storage, script):
    saga_id = uuid.uuid4()
    script.fail("StepA", "act", Crash())
    with pytest.raises(Crash):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    await storage.update_status(saga_id, SagaStatus.PARKED)
    before = await state(storage, saga_id)
    with pytest.raises(SagaParkedError):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    assert await state(storage, saga_id) == before
    assert script.count("StepA", "act") == 1


# -- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, -1])
def test_a_retry_count_below_one_is_rejected(storage, script, count):
    with pytest.raises(ValueError, match="compensation_retry_count"):
        transaction(ThreeStepSaga(), script, storage, compensation_retry_count=count)


@pytest.mark.parametrize("lease", [0, -5])
def test_a_non_positive_lease_is_rejected(storage, script, lease):
    with pytest.raises(ValueError, match="lease_seconds"):
        transaction(ThreeStepSaga(), script, storage, lease_seconds=lease)


async def test_starting_by_id_past_the_recovery_limit_parks_instead_of_running(storage, script):
    saga_id = uuid.uuid4()
    script.fail("StepB", "act", Crash(), Crash())
    with pytest.raises(Crash):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    with pytest.raises(Crash):  # the first start by id: one attempt, within the limit of 1
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id,
                                max_recovery_attempts=1))
    txn = transaction(ThreeStepSaga(), script, storage, saga_id=saga_id, max_recovery_attempts=1)
    assert await drive(txn) == []
    assert txn.status is SagaStatus.PARKED
    assert (await state(storage, saga_id)).status is SagaStatus.PARKED
    assert script.acts() == ["StepA", "StepB", "StepB"]


async def test_starting_another_sagas_id_raises_definition_error_and_runs_nothing(storage, script):
    saga_id = uuid.uuid4()
    script.fail("StepB", "act", Crash())
    with pytest.raises(Crash):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    before = await state(storage, saga_id)
    with pytest.raises(SagaDefinitionError, match="ThreeStepSaga"):
        await drive(transaction(FourStepSaga(), script, storage, saga_id=saga_id))
    assert script.acts() == ["StepA", "StepB"]
    row = await state(storage, saga_id)
    assert (row.status, row.lease_owner) == (SagaStatus.RUNNING, None)
    assert row == before  # nothing written: no lease taken, no attempt counted
