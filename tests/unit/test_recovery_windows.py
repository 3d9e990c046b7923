"""Recovery of sagas cut off between the writes of one checkpoint.

A commit-per-call storage writes a checkpoint as several calls (context, log entries, status), so
a crash can leave e.g. a failed act logged while the status still says RUNNING. These states are
built here directly through the storage protocol.
"""

from __future__ import annotations

import uuid

from sagakit import MemorySagaStorage, SagaStatus, SagaStepStatus, recover_saga
from tests.unit.support import Ctx, Script, Snapshots, ThreeStepSaga, drive, history, transaction


async def stored_saga(
    storage: MemorySagaStorage, status: SagaStatus, *entries: tuple[str, str, SagaStepStatus]
) -> uuid.UUID:
    saga_id = uuid.uuid4()
    await storage.create_saga(saga_id, "ThreeStepSaga", Ctx(trail=["StepA"]).to_dict())
    await storage.update_status(saga_id, status)
    for step, action, step_status in entries:
        await storage.log_step(saga_id, step, action, step_status)
    return saga_id


A_DONE = ("StepA", "act", SagaStepStatus.COMPLETED)
B_DONE = ("StepB", "act", SagaStepStatus.COMPLETED)
C_DONE = ("StepC", "act", SagaStepStatus.COMPLETED)
B_FAILED = ("StepB", "act", SagaStepStatus.FAILED)


async def recover(script: Script, storage: MemorySagaStorage, saga_id: uuid.UUID) -> SagaStatus:
    return await recover_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage,
                              compensation_retry_delay=0)


async def test_running_saga_with_every_step_logged_is_only_marked_completed(storage, script):
    saga_id = await stored_saga(storage, SagaStatus.RUNNING, A_DONE, B_DONE, C_DONE)
    assert await recover(script, storage, saga_id) is SagaStatus.COMPLETED
    assert script.calls == []
    assert (await storage.get_saga(saga_id)).status is SagaStatus.COMPLETED


async def test_running_saga_with_a_failed_act_logged_goes_backward(storage, script):
    saga_id = await stored_saga(storage, SagaStatus.RUNNING, A_DONE, B_FAILED)
    assert await recover(script, storage, saga_id) is SagaStatus.FAILED
    assert script.acts() == []
    assert script.compensations() == ["StepA"]


async def test_compensating_is_durable_before_the_first_compensate_of_a_cut_off_saga(
    storage, script
):
    saga_id = await stored_saga(storage, SagaStatus.RUNNING, A_DONE, B_FAILED)
    seen = Snapshots(storage, saga_id)
    script.hook("StepA", "compensate", seen)
    await recover(script, storage, saga_id)
    [(status, _, _)] = seen.taken
    assert status == "COMPENSATING"


async def test_compensating_saga_with_every_compensation_logged_is_only_marked_failed(
    storage, script
):
    saga_id = await stored_saga(
        storage, SagaStatus.COMPENSATING, A_DONE, B_FAILED,
        ("StepA", "compensate", SagaStepStatus.COMPENSATED),
    )
    assert await recover(script, storage, saga_id) is SagaStatus.FAILED
    assert script.calls == []


async def test_a_pending_saga_started_by_id_runs_with_its_stored_context(storage, script):
    saga_id = uuid.uuid4()
    await storage.create_saga(saga_id, "ThreeStepSaga", Ctx("stored-order").to_dict())
    txn = transaction(ThreeStepSaga(), script, storage, Ctx("ignored"), saga_id=saga_id)
    results = await drive(txn)
    assert [r.step_name for r in results] == ["StepA", "StepB", "StepC"]
    assert txn.context.order_id == "stored-order"
    assert (await storage.get_saga(saga_id)).status is SagaStatus.COMPLETED
    assert await history(storage, saga_id) == [
        ("StepA", "act", "COMPLETED"), ("StepB", "act", "COMPLETED"), ("StepC", "act", "COMPLETED"),
    ]
