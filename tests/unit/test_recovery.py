"""Recovery under Strict Backward Recovery: crashes forward and backward, the point of no return,
idempotent skipping, PENDING sagas, parking, resume and abort.

Crashes are simulated by a step raising a BaseException (Crash, KeyboardInterrupt, SystemExit,
CancelledError), by cancelling the task, or by breaking out of the iteration.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from sagakit import (
    MemorySagaStorage,
    Saga,
    SagaBusyError,
    SagaDefinitionError,
    SagaNotFoundError,
    SagaStatus,
    abort_saga,
    recover_saga,
    resume_saga,
)
from tests.unit.support import (
    Crash,
    Ctx,
    Gate,
    Script,
    StepA,
    StepB,
    StepC,
    ThreeStepSaga,
    drive,
    history,
    state,
    transaction,
)


async def recover(
    script: Script, storage: MemorySagaStorage, saga_id: uuid.UUID, **kw: object
) -> SagaStatus:
    kw.setdefault("compensation_retry_delay", 0.0)
    return await recover_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage, **kw)


async def crash_forward(
    script: Script, storage: MemorySagaStorage, step: str, error: BaseException | None = None
) -> uuid.UUID:
    """Run ThreeStepSaga until ``step``'s act raises ``error`` (a Crash by default)."""
    saga_id = uuid.uuid4()
    error = error if error is not None else Crash()
    script.fail(step, "act", error)
    with pytest.raises(type(error)):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    return saga_id


async def crash_backward(script, storage, step: str) -> uuid.UUID:
    """StepC fails; the compensation of ``step`` then crashes."""
    saga_id = uuid.uuid4()
    script.fail("StepC", "act", RuntimeError("boom"))
    script.fail(step, "compensate", Crash())
    with pytest.raises(Crash):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    return saga_id


# -- crash during forward execution --------------------------------------------------------------


@pytest.mark.parametrize(
    "error", [Crash(), KeyboardInterrupt(), SystemExit(3), asyncio.CancelledError()],
    ids=["crash", "keyboard-interrupt", "system-exit", "cancelled"],
)
async def test_a_base_exception_leaves_the_saga_at_its_last_checkpoint(storage, script, error):
    saga_id = await crash_forward(script, storage, "StepB", error)
    assert script.compensations() == []
    row = await state(storage, saga_id)
    assert row.status is SagaStatus.RUNNING
    assert row.version == 2
    assert row.lease_owner is None
    assert await history(storage, saga_id) == [("StepA", "act", "COMPLETED")]


async def test_recovery_after_a_forward_crash_skips_completed_steps(storage, script):
    saga_id = await crash_forward(script, storage, "StepC")
    assert await recover(script, storage, saga_id) is SagaStatus.COMPLETED
    assert script.acts() == ["StepA", "StepB", "StepC", "StepC"]
    row = await state(storage, saga_id)
    assert row.status is SagaStatus.COMPLETED
    assert row.context["trail"] == ["StepA", "StepB", "StepC"]
    assert row.recovery_attempts == 1


async def test_recovery_continues_from_the_stored_context(storage, script):
    saga_id = await crash_forward(script, storage, "StepB")
    seen = []

    async def look(handler, context):
        seen.append((context.order_id, list(context.trail)))

    script.hook("StepB", "act", look)
    await recover(script, storage, saga_id)
    assert seen == [("order-1", ["StepA"])]


async def test_a_step_failing_in_forward_recovery_compensates_and_returns_failed(storage, script):
    saga_id = await crash_forward(script, storage, "StepC")
    script.fail("StepC", "act", RuntimeError("still broken"))
    assert await recover(script, storage, saga_id) is SagaStatus.FAILED
    assert script.compensations() == ["StepB", "StepA"]
    assert (await state(storage, saga_id)).status is SagaStatus.FAILED


async def test_recovery_after_cancelling_the_task(storage, script):
    saga_id = uuid.uuid4()
    gate = Gate()
    script.hook("StepB", "act", gate)
    task = asyncio.create_task(
        drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    )
    await gate.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    row = await state(storage, saga_id)
    assert (row.status, row.version, row.lease_owner) == (SagaStatus.RUNNING, 2, None)
    script.unhook("StepB", "act")
    assert await recover(script, storage, saga_id) is SagaStatus.COMPLETED
    assert script.acts() == ["StepA", "StepB", "StepB", "StepC"]


async def test_breaking_out_of_the_iteration_leaves_the_saga_resumable(storage, script):
    saga_id = uuid.uuid4()
    async with transaction(ThreeStepSaga(), script, storage, saga_id=saga_id) as txn:
        async for result in txn:
            assert result.step_name == "StepA"
            break
    row = await state(storage, saga_id)
    assert (row.status, row.version, row.lease_owner) == (SagaStatus.RUNNING, 2, None)
    results = await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    assert [r.step_name for r in results] == ["StepB", "StepC"]
    assert script.acts() == ["StepA", "StepB", "StepC"]


async def test_pending_saga_created_through_the_storage_is_recoverable(storage, script):
    saga_id = uuid.uuid4()
    await storage.create_saga(saga_id, "ThreeStepSaga", Ctx("pending-order").to_dict())
    assert (await state(storage, saga_id)).status is SagaStatus.PENDING
    assert saga_id in await storage.get_sagas_for_recovery(limit=10)
    assert await recover(script, storage, saga_id) is SagaStatus.COMPLETED
    assert script.acts() == ["StepA", "StepB", "StepC"]
    assert (await state(storage, saga_id)).context["order_id"] == "pending-order"


# -- crash during compensation and the point of no return ----------------------------------------


async def test_recovery_after_a_crash_during_compensation_finishes_the_rollback(storage, script):
    saga_id = await crash_backward(script, storage, "StepA")
    assert (await state(storage, saga_id)).status is SagaStatus.COMPENSATING
    assert await recover(script, storage, saga_id) is SagaStatus.FAILED
    assert script.compensations() == ["StepB", "StepA", "StepA"]  # StepB not compensated twice
    assert script.acts() == ["StepA", "StepB", "StepC"]
    assert (await history(storage, saga_id))[-1] == ("StepA", "compensate", "COMPENSATED")


async def test_compensating_saga_never_runs_forward_again(storage, script):
    saga_id = await crash_backward(script, storage, "StepB")
    script.heal("StepC", "act")  # the failed step would succeed now: it must not matter
    assert await recover(script, storage, saga_id) is SagaStatus.FAILED
    assert script.acts() == ["StepA", "StepB", "StepC"]
    assert script.compensations() == ["StepB", "StepB", "StepA"]


async def test_compensating_status_alone_forbids_forward_execution(storage, script):
    saga_id = await crash_forward(script, storage, "StepB")  # RUNNING, StepA completed
    await storage.update_status(saga_id, SagaStatus.COMPENSATING)
    assert await recover(script, storage, saga_id) is SagaStatus.FAILED
    assert script.acts() == ["StepA", "StepB"]
    assert script.compensations() == ["StepA"]


async def test_recovering_a_terminal_saga_runs_and_writes_nothing(storage, script):
    saga_id = uuid.uuid4()
    await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    before = await state(storage, saga_id)
    assert await recover(script, storage, saga_id) is SagaStatus.COMPLETED
    assert await state(storage, saga_id) == before
    assert script.acts() == ["StepA", "StepB", "StepC"]


async def test_recovering_a_saga_leased_by_a_live_run_is_busy(storage, script):
    saga_id = uuid.uuid4()
    gate = Gate()
    script.hook("StepB", "act", gate)
    task = asyncio.create_task(
        drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    )
    await gate.entered.wait()
    before = await state(storage, saga_id)
    with pytest.raises(SagaBusyError):
        await recover(script, storage, saga_id)
    assert await state(storage, saga_id) == before
    gate.release.set()
    await task
    assert script.acts() == ["StepA", "StepB", "StepC"]


async def test_recovering_an_unknown_saga_raises(storage, script):
    with pytest.raises(SagaNotFoundError):
        await recover(script, storage, uuid.uuid4())


async def test_recovering_with_another_sagas_definition_writes_nothing(storage, script):
    saga_id = await crash_forward(script, storage, "StepB")
    before = await state(storage, saga_id)

    class OtherSaga(Saga[Ctx]):
        steps = [StepA, StepB]

    with pytest.raises(SagaDefinitionError):
        await recover_saga(OtherSaga, saga_id, Ctx, script.container, storage)
    assert await state(storage, saga_id) == before


async def test_a_log_that_no_longer_fits_the_definition_parks_the_saga(storage, script):
    saga_id = await crash_forward(script, storage, "StepC")  # StepA, StepB completed

    class ThreeStepSaga_(Saga[Ctx]):
        name = "ThreeStepSaga"
        steps = [StepA, StepC]

    with pytest.raises(SagaDefinitionError, match="StepB"):
        await recover_saga(ThreeStepSaga_, saga_id, Ctx, script.container, storage)
    assert (await state(storage, saga_id)).status is SagaStatus.PARKED
    assert script.acts() == ["StepA", "StepB", "StepC"]


async def test_reordering_completed_steps_parks_the_saga_untouched(storage, script):
    saga_id = await crash_forward(script, storage, "StepC")  # StepA, StepB completed
    before = await state(storage, saga_id)
    logged = await storage.get_step_history(saga_id)

    class ThreeStepSaga_(Saga[Ctx]):
        name = "ThreeStepSaga"
        steps = [StepB, StepA, StepC]  # the two completed steps swapped

    with pytest.raises(SagaDefinitionError, match="reordered") as raised:
        await recover_saga(ThreeStepSaga_, saga_id, Ctx, script.container, storage)
    assert "'StepA' before step 'StepB'" in str(raised.value)
    after = await state(storage, saga_id)
    assert after.status is SagaStatus.PARKED
    assert after.context == before.context
    assert await storage.get_step_history(saga_id) == logged  # no entry written
    assert script.calls == [("StepA", "act"), ("StepB", "act"), ("StepC", "act")]  # none since


# -- parking, resume and abort ---------------------------------------------------------------------


async def park_by_exhaustion(script, storage, saga_id, limit: int = 2) -> None:
    options = {"max_recovery_attempts": limit, "compensation_retry_count": 1}
    for _ in range(limit):
        assert await recover(script, storage, saga_id, **options) is SagaStatus.COMPENSATING
    assert await recover(script, storage, saga_id, **options) is SagaStatus.PARKED


async def test_a_compensation_failing_past_the_recovery_limit_parks_the_saga(storage, script):
    script.fail("StepC", "act", RuntimeError("boom"))
    script.always("StepA", "compensate", RuntimeError("down"))
    saga_id = uuid.uuid4()
    with pytest.raises(RuntimeError):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id,
                                compensation_retry_count=1))
    await park_by_exhaustion(script, storage, saga_id, limit=2)
    assert script.count("StepA", "compensate") == 1 + 2  # the parking call ran nothing
    assert script.count("StepB", "compensate") == 1
    assert saga_id not in await storage.get_sagas_for_recovery(limit=10, max_recovery_attempts=99)
    # Never retried automatically: another recovery call leaves it parked and runs nothing.
    assert await recover(script, storage, saga_id) is SagaStatus.PARKED
    assert script.count("StepA", "compensate") == 3


async def test_resume_saga_finishes_a_parked_rollback(storage, script):
    script.fail("StepC", "act", RuntimeError("boom"))
    script.always("StepA", "compensate", RuntimeError("down"))
    saga_id = uuid.uuid4()
    with pytest.raises(RuntimeError):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id,
                                compensation_retry_count=1))
    await park_by_exhaustion(script, storage, saga_id, limit=1)
    script.heal("StepA", "compensate")
    status = await resume_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage,
                               compensation_retry_delay=0)
    assert status is SagaStatus.FAILED
    assert script.count("StepB", "compensate") == 1
    assert script.acts() == ["StepA", "StepB", "StepC"]
    assert (await state(storage, saga_id)).recovery_attempts == 0


async def test_resume_saga_continues_a_parked_forward_saga(storage, script):
    saga_id = await crash_forward(script, storage, "StepC")
    script.always("StepC", "act", Crash())
    for _ in range(2):
        with pytest.raises(Crash):
            await recover(script, storage, saga_id, max_recovery_attempts=2)
    assert await recover(script, storage, saga_id, max_recovery_attempts=2) is SagaStatus.PARKED
    assert (await state(storage, saga_id)).status is SagaStatus.PARKED
    script.heal("StepC", "act")
    assert await resume_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage) is (
        SagaStatus.COMPLETED
    )
    assert script.acts() == ["StepA", "StepB"] + ["StepC"] * 4
    assert script.compensations() == []


async def test_abort_saga_compensates_a_running_saga_on_purpose(storage, script):
    saga_id = await crash_forward(script, storage, "StepC")
    status = await abort_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage,
                              reason="customer cancelled", compensation_retry_delay=0)
    assert status is SagaStatus.FAILED
    assert script.compensations() == ["StepB", "StepA"]
    assert script.acts() == ["StepA", "StepB", "StepC"]
    aborted = [e for e in await storage.get_step_history(saga_id) if e.error_type == "SagaAborted"]
    assert len(aborted) == 1
    assert aborted[0].step_name == "StepC"
    assert "customer cancelled" in (aborted[0].details or "")


async def test_abort_saga_compensates_a_parked_saga(storage, script):
    saga_id = await crash_forward(script, storage, "StepB")
    await storage.update_status(saga_id, SagaStatus.PARKED)
    assert await abort_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage) is (
        SagaStatus.FAILED
    )
    assert script.compensations() == ["StepA"]


async def test_abort_saga_leaves_a_terminal_saga_alone(storage, script):
    saga_id = uuid.uuid4()
    await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    before = await state(storage, saga_id)
    assert await abort_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage) is (
        SagaStatus.COMPLETED
    )
    assert await state(storage, saga_id) == before
    assert script.compensations() == []


async def test_recovery_needs_a_storage(script):
    with pytest.raises(ValueError, match="storage"):
        await recover_saga(ThreeStepSaga, uuid.uuid4(), Ctx, script.container, None)


async def test_recovery_rejects_a_retry_count_below_one(storage, script):
    saga_id = await crash_forward(script, storage, "StepB")
    with pytest.raises(ValueError, match="compensation_retry_count"):
        await recover(script, storage, saga_id, compensation_retry_count=0)
    assert script.acts() == ["StepA", "StepB"]


async def test_recovery_uses_the_saga_context_type_without_a_builder(storage, script):
    saga_id = await crash_forward(script, storage, "StepB")
    assert await recover_saga(ThreeStepSaga(), saga_id, None, script.container, storage) is (
        SagaStatus.COMPLETED
    )
    assert script.acts() == ["StepA", "StepB", "StepB", "StepC"]

