"""The engine's forward recovery on the memory storage: retries, timeouts, in-process and durable
waits, the pivot, deadlines, and resuming after a fix (see docs/forward-recovery.md)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from sagakit import (
    MemorySagaStorage,
    PermanentError,
    RecoveryWorker,
    Retry,
    Saga,
    SagaPastPivotError,
    SagaStatus,
    Step,
    StepTimeoutError,
    abort_saga,
    current_invocation,
    permanent,
    recover_saga,
    resume_saga,
)
from tests.unit.support import (
    Crash,
    Ctx,
    Script,
    StepA,
    StepB,
    StepC,
    drive,
    history,
    transaction,
    until,
)

QUICK = Retry(attempts=3, delay=0.0)


class RetriedSaga(Saga[Ctx]):
    steps = [StepA, Step(StepB, retry=QUICK), StepC]


class PivotSaga(Saga[Ctx]):
    steps = [StepA, Step(StepB, pivot=True), Step(StepC, retry=QUICK)]


class Flaky(ConnectionError):
    pass


def entries(log: list[Any]) -> list[tuple[str, str, str, int | None]]:
    return [(e.step_name, e.action.value, e.status.value, e.attempt) for e in log]


class Commits:
    """Counts the memory storage's committed writes."""

    def __init__(self, storage: MemorySagaStorage) -> None:
        self.count = 0
        write = storage._write

        def counted(cp: Any) -> int:
            self.count += 1
            return write(cp)

        storage._write = counted  # type: ignore[method-assign]


async def test_a_flaky_step_is_retried_and_each_failed_attempt_costs_one_write() -> None:
    storage, script, saga_id = MemorySagaStorage(), Script(), uuid.uuid4()
    script.fail("StepB", "act", Flaky("blip 1"), Flaky("blip 2"))
    commits = Commits(storage)
    results = await drive(transaction(RetriedSaga(), script, storage, saga_id=saga_id))
    assert [r.step_name for r in results] == ["StepA", "StepB", "StepC"]  # failures not yielded
    assert script.acts() == ["StepA", "StepB", "StepB", "StepB", "StepC"]
    assert entries(await storage.get_step_history(saga_id)) == [
        ("StepA", "act", "COMPLETED", None),
        ("StepB", "act", "RETRYING", 1),
        ("StepB", "act", "RETRYING", 2),
        ("StepB", "act", "COMPLETED", 3),
        ("StepC", "act", "COMPLETED", None),
    ]
    assert commits.count == 3 + 2  # N checkpoints (the start is not a checkpoint) + 2 failures
    assert (await storage.get_saga(saga_id)).status is SagaStatus.COMPLETED


async def test_every_attempt_sees_the_same_key_and_the_context_of_the_last_checkpoint() -> None:
    storage, script = MemorySagaStorage(), Script()
    seen: list[tuple[str, int, list[str]]] = []

    async def look(handler: Any, context: Ctx) -> None:
        invocation = current_invocation()
        assert invocation is not None
        seen.append((handler.idempotency_key, invocation.attempt, list(context.trail)))
        context.trail.append("half-done")  # what a failing attempt leaves behind

    script.hook("StepB", "act", look)
    script.fail("StepB", "act", Flaky("blip"), Flaky("blip"))
    transaction_ = transaction(RetriedSaga(), script, storage)
    await drive(transaction_)
    keys = {key for key, _, _ in seen}
    assert len(keys) == 1
    assert next(iter(keys)).endswith(":StepB:act")
    assert [(attempt, trail) for _, attempt, trail in seen] == [
        (1, ["StepA"]), (2, ["StepA"]), (3, ["StepA"])]
    assert transaction_.context.trail == ["StepA", "half-done", "StepB", "StepC"]


@pytest.mark.parametrize("error", [
    PermanentError("declined"),
    permanent(Flaky("marked")),
    ValueError("not a retry_on error"),
], ids=["PermanentError", "permanent()", "not-retry_on"])
async def test_errors_that_are_not_retried_fail_the_step_at_once(error: Exception) -> None:
    class Picky(Saga[Ctx]):
        steps = [StepA, Step(StepB, retry=Retry(attempts=5, delay=0, retry_on=(Flaky,)))]

    storage, script, saga_id = MemorySagaStorage(), Script(), uuid.uuid4()
    script.fail("StepB", "act", error)
    with pytest.raises(type(error)):
        await drive(transaction(Picky(), script, storage, saga_id=saga_id))
    assert script.acts() == ["StepA", "StepB"]
    assert (await storage.get_saga(saga_id)).status is SagaStatus.FAILED
    assert script.compensations() == ["StepA"]


async def test_give_up_on_wins_over_retry_on() -> None:
    class Declined(Flaky):
        pass

    class Careful(Saga[Ctx]):
        steps = [Step(StepA, retry=Retry(attempts=5, delay=0, retry_on=(Flaky,),
                                         give_up_on=(Declined,)))]

    storage, script = MemorySagaStorage(), Script()
    script.fail("StepA", "act", Flaky("blip"), Declined("no"))
    with pytest.raises(Declined):
        await drive(transaction(Careful(), script, storage))
    assert script.acts() == ["StepA", "StepA"]


async def test_exhausted_retries_before_the_pivot_compensate_and_log_the_last_attempt() -> None:
    storage, script, saga_id = MemorySagaStorage(), Script(), uuid.uuid4()
    script.always("StepB", "act", Flaky("down"))
    with pytest.raises(Flaky) as raised:
        await drive(transaction(RetriedSaga(), script, storage, saga_id=saga_id))
    assert any("gave up after attempt 3" in note for note in raised.value.__notes__)
    assert script.count("StepB", "act") == 3
    assert script.compensations() == ["StepA"]
    log = entries(await storage.get_step_history(saga_id))
    assert log[1:4] == [("StepB", "act", "RETRYING", 1), ("StepB", "act", "RETRYING", 2),
                        ("StepB", "act", "FAILED", 3)]
    assert (await storage.get_saga(saga_id)).status is SagaStatus.FAILED


async def test_an_attempt_past_its_timeout_is_cancelled_and_retried() -> None:
    class Timed(Saga[Ctx]):
        steps = [Step(StepA, retry=Retry(attempts=2, delay=0), timeout=0.05)]

    storage, script, saga_id = MemorySagaStorage(), Script(), uuid.uuid4()
    cancelled: list[bool] = []

    async def stall(handler: Any, context: Any) -> None:
        if not cancelled:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

    script.hook("StepA", "act", stall)
    await drive(transaction(Timed(), script, storage, saga_id=saga_id))
    assert cancelled == [True]
    (first, done) = await storage.get_step_history(saga_id)
    assert (first.status.value, first.error_type) == ("RETRYING", "sagakit.exceptions.StepTimeoutError")
    assert "took longer than its timeout of 0.05 s" in (first.details or "")
    assert done.status.value == "COMPLETED"


async def test_a_timeout_that_keeps_expiring_fails_the_step_naming_saga_and_step() -> None:
    class Timed(Saga[Ctx]):
        steps = [StepA, Step(StepB, timeout=0.02)]

    storage, script = MemorySagaStorage(), Script()

    async def stall(handler: Any, context: Any) -> None:
        await asyncio.sleep(30)

    script.hook("StepB", "act", stall)
    with pytest.raises(StepTimeoutError) as raised:
        await drive(transaction(Timed(), script, storage))
    assert (raised.value.saga_name, raised.value.step_name) == ("Timed", "StepB")
    assert script.compensations() == ["StepA"]


async def test_a_compensation_past_its_timeout_fails_and_is_retried_like_any() -> None:
    class Timed(Saga[Ctx]):
        steps = [Step(StepA, compensate_timeout=0.02), StepB]

    storage, script, saga_id = MemorySagaStorage(), Script(), uuid.uuid4()
    stalls = [True]

    async def stall_once(handler: Any, context: Any) -> None:
        if stalls:
            stalls.pop()
            await asyncio.sleep(30)

    script.hook("StepA", "compensate", stall_once)
    script.fail("StepB", "act", ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        await drive(transaction(Timed(), script, storage, saga_id=saga_id))
    assert script.count("StepA", "compensate") == 2  # the cut-off attempt, then a good one
    assert (await storage.get_saga(saga_id)).status is SagaStatus.FAILED


async def test_a_long_wait_is_durable_and_a_worker_finishes_the_saga_when_it_is_due() -> None:
    class Patient(Saga[Ctx]):
        steps = [StepA, Step(StepB, retry=Retry(attempts=3, delay=0.3))]
        durable_wait = 0.1

    storage, script, saga_id = MemorySagaStorage(), Script(), uuid.uuid4()
    script.fail("StepB", "act", Flaky("blip"))
    txn = transaction(Patient(), script, storage, saga_id=saga_id)
    results = await drive(txn)
    assert [r.step_name for r in results] == ["StepA"]
    assert txn.status is SagaStatus.WAITING
    row = await storage.get_saga(saga_id)
    assert (row.status, row.lease_owner) == (SagaStatus.WAITING, None)
    assert row.next_attempt_at is not None
    assert await storage.get_sagas_for_recovery(10) == []  # not due yet
    worker = RecoveryWorker(storage, [Patient], script.container, poll_interval=0.05)
    task = asyncio.create_task(worker.run(install_signal_handlers=False))

    async def completed() -> bool:
        return (await storage.get_saga(saga_id)).status is SagaStatus.COMPLETED

    await until(completed)
    worker.stop()
    await task
    row = await storage.get_saga(saga_id)
    assert row.status is SagaStatus.COMPLETED
    assert row.recovery_attempts == 0  # a wait is no interruption
    assert entries(await storage.get_step_history(saga_id))[1:] == [
        ("StepB", "act", "RETRYING", 1), ("StepB", "act", "COMPLETED", 2)]


async def test_a_crash_during_an_in_process_wait_resumes_at_the_stated_time() -> None:
    class Waits(Saga[Ctx]):
        steps = [StepA, Step(StepB, retry=Retry(attempts=3, delay=0.4))]
        durable_wait = 10.0

    storage, script, saga_id = MemorySagaStorage(), Script(), uuid.uuid4()
    script.fail("StepB", "act", Flaky("blip"))
    task = asyncio.create_task(drive(transaction(Waits(), script, storage, saga_id=saga_id,
                                                 lease_seconds=0.2)))
    async def retrying() -> bool:  # the failed attempt's checkpoint is written
        return any(e.status.value == "RETRYING" for e in await storage.get_step_history(saga_id))

    await until(retrying)
    row = await storage.get_saga(saga_id)
    assert (row.status, row.lease_owner is not None) == (SagaStatus.RUNNING, True)
    assert row.next_attempt_at is not None
    task.cancel()  # the process "dies" in the middle of its wait (its lease is released)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await storage.get_sagas_for_recovery(10) == []  # the next attempt is not due yet

    async def due() -> bool:
        return await storage.get_sagas_for_recovery(10) == [saga_id]

    await until(due)
    status = await recover_saga(Waits, saga_id, Ctx, script.container, storage)
    assert status is SagaStatus.COMPLETED
    assert entries(await storage.get_step_history(saga_id))[1:] == [
        ("StepB", "act", "RETRYING", 1), ("StepB", "act", "COMPLETED", 2)]


async def test_past_the_pivot_a_failing_step_parks_the_saga_and_nothing_is_compensated() -> None:
    storage, script, saga_id = MemorySagaStorage(), Script(), uuid.uuid4()
    script.always("StepC", "act", Flaky("courier down"))
    with pytest.raises(Flaky) as raised:
        await drive(transaction(PivotSaga(), script, storage, saga_id=saga_id))
    assert any("PARKED" in note for note in raised.value.__notes__)
    assert script.compensations() == []
    row = await storage.get_saga(saga_id)
    assert (row.status, row.past_pivot, row.lease_owner) == (SagaStatus.PARKED, True, None)
    assert entries(await storage.get_step_history(saga_id))[2:] == [
        ("StepC", "act", "RETRYING", 1), ("StepC", "act", "RETRYING", 2),
        ("StepC", "act", "FAILED", 3)]

    with pytest.raises(SagaPastPivotError):
        await abort_saga(PivotSaga, saga_id, Ctx, script.container, storage)
    assert await storage.get_saga(saga_id) == row  # nothing written

    script.heal("StepC", "act")  # a fix is deployed: a fresh budget, forward
    assert await resume_saga(PivotSaga, saga_id, Ctx, script.container, storage) is (
        SagaStatus.COMPLETED)
    assert entries(await storage.get_step_history(saga_id))[-1] == (
        "StepC", "act", "COMPLETED", 1)
    assert script.compensations() == []


async def test_the_pivot_itself_failing_compensates_the_steps_before_it() -> None:
    storage, script, saga_id = MemorySagaStorage(), Script(), uuid.uuid4()
    script.fail("StepB", "act", ValueError("declined"))
    with pytest.raises(ValueError, match="declined"):
        await drive(transaction(PivotSaga(), script, storage, saga_id=saga_id))
    row = await storage.get_saga(saga_id)
    assert (row.status, row.past_pivot) == (SagaStatus.FAILED, False)
    assert script.compensations() == ["StepA"]


async def test_recovery_of_a_saga_cut_off_past_its_pivot_goes_forward() -> None:
    storage, script, saga_id = MemorySagaStorage(), Script(), uuid.uuid4()
    script.fail("StepC", "act", Crash())
    with pytest.raises(Crash):
        await drive(transaction(PivotSaga(), script, storage, saga_id=saga_id))
    assert (await storage.get_saga(saga_id)).past_pivot
    script.fail("StepC", "act", Flaky("blip"))
    assert await recover_saga(PivotSaga, saga_id, Ctx, script.container, storage) is (
        SagaStatus.COMPLETED)
    assert script.compensations() == []


async def test_a_deadline_stops_retries_before_the_pivot_but_not_after() -> None:
    class Hurried(Saga[Ctx]):
        steps = [StepA, Step(StepB, retry=Retry(attempts=10, delay=0.05), pivot=True),
                 Step(StepC, retry=Retry(attempts=10, delay=0.05))]
        deadline = 0.12

    storage, script, saga_id = MemorySagaStorage(), Script(), uuid.uuid4()
    script.always("StepB", "act", Flaky("down"))
    with pytest.raises(Flaky) as raised:
        await drive(transaction(Hurried(), script, storage, saga_id=saga_id))
    assert any("deadline" in note for note in raised.value.__notes__)
    assert 1 < script.count("StepB", "act") < 10
    row = await storage.get_saga(saga_id)
    assert row.status is SagaStatus.FAILED
    assert row.deadline_at is not None

    storage, script, saga_id = MemorySagaStorage(), Script(), uuid.uuid4()
    script.fail("StepC", "act", *[Flaky("slow courier")] * 5)  # 0.05 * 5 > the deadline
    await drive(transaction(Hurried(), script, storage, saga_id=saga_id))
    assert (await storage.get_saga(saga_id)).status is SagaStatus.COMPLETED
    assert script.count("StepC", "act") == 6


async def test_a_run_shutting_down_makes_its_wait_durable() -> None:
    class Waits(Saga[Ctx]):
        steps = [Step(StepA, retry=Retry(attempts=2, delay=0.01))]

    storage, script, saga_id = MemorySagaStorage(), Script(), uuid.uuid4()
    txn = transaction(Waits(), script, storage, saga_id=saga_id)

    async def shutdown_begins(handler: Any, context: Any) -> None:
        assert txn.execution is not None
        txn.execution.should_stop = lambda: True  # as a worker's graceful shutdown does

    script.hook("StepA", "act", shutdown_begins)
    script.fail("StepA", "act", Flaky("blip"))
    assert await drive(txn) == []
    row = await storage.get_saga(saga_id)
    assert (row.status, row.lease_owner) == (SagaStatus.WAITING, None)
    assert script.count("StepA", "act") == 1  # no attempt while shutting down


async def test_a_saga_without_options_logs_and_costs_what_it_did() -> None:
    from tests.unit.support import ThreeStepSaga

    storage, script, saga_id = MemorySagaStorage(), Script(), uuid.uuid4()
    commits = Commits(storage)
    await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    assert commits.count == 3  # plus the start: N+1 writes for N steps
    assert [e.attempt for e in await storage.get_step_history(saga_id)] == [None] * 3
    assert await history(storage, saga_id) == [
        ("StepA", "act", "COMPLETED"), ("StepB", "act", "COMPLETED"),
        ("StepC", "act", "COMPLETED")]
