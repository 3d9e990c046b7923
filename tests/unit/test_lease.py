"""The lease keeper: a step that outlives its lease keeps the saga leased; a lost lease is
noticed and the run writes nothing more."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from sagakit import MemorySagaStorage, SagaBusyError, SagaLeaseLostError, SagaStatus
from tests.unit.support import Gate, Script, ThreeStepSaga, transaction


async def test_a_step_longer_than_the_lease_keeps_the_saga_leased() -> None:
    storage, script = MemorySagaStorage(), Script()
    gate = Gate()
    script.hook("StepB", "act", gate)
    saga_id = uuid.uuid4()
    running = asyncio.create_task(
        transaction(ThreeStepSaga(), script, storage, saga_id=saga_id, lease_seconds=0.3).run()
    )
    await gate.entered.wait()
    await asyncio.sleep(0.9)  # three leases long: only renewals keep it
    state = await storage.get_saga(saga_id)
    assert state.lease_owner is not None
    assert await storage.get_sagas_for_recovery(10) == []
    with pytest.raises(SagaBusyError):
        await transaction(ThreeStepSaga(), script, storage, saga_id=saga_id).run()
    gate.release.set()
    assert await running is SagaStatus.COMPLETED
    assert script.count("StepB", "act") == 1


async def test_a_run_that_lost_its_lease_is_fenced_out(monkeypatch: pytest.MonkeyPatch) -> None:
    storage, script = MemorySagaStorage(), Script()
    gate = Gate()
    script.hook("StepB", "act", gate)

    async def paused(self: object, lease_seconds: float) -> None:  # a stalled worker
        return None

    monkeypatch.setattr(type(await _a_run(storage)), "renew_lease", paused)
    saga_id = uuid.uuid4()
    stalled = asyncio.create_task(
        transaction(ThreeStepSaga(), script, storage, saga_id=saga_id, lease_seconds=0.2).run()
    )
    await gate.entered.wait()
    await asyncio.sleep(0.4)
    assert await storage.get_sagas_for_recovery(10) == [saga_id]
    script.unhook("StepB", "act")
    taken = await transaction(ThreeStepSaga(), script, storage, saga_id=saga_id).run()
    assert taken is SagaStatus.COMPLETED
    before = await storage.get_step_history(saga_id)
    gate.release.set()
    with pytest.raises(SagaLeaseLostError):
        await stalled
    assert await storage.get_step_history(saga_id) == before  # the stale run wrote nothing


async def _a_run(storage: MemorySagaStorage) -> object:
    async with storage.create_run() as run:
        return run
