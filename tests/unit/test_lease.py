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


async def test_one_timer_watches_every_running_saga_and_the_shortest_lease_sets_its_pace() -> None:
    from sagakit.lease import _Sweeper

    storage, script = MemorySagaStorage(), Script()
    gate = Gate()
    script.hook("StepB", "act", gate)
    long_id, short_id = uuid.uuid4(), uuid.uuid4()
    long_run = asyncio.create_task(
        transaction(ThreeStepSaga(), script, storage, saga_id=long_id, lease_seconds=60).run())
    await gate.entered.wait()
    gate.entered.clear()
    short_run = asyncio.create_task(
        transaction(ThreeStepSaga(), script, storage, saga_id=short_id, lease_seconds=0.3).run())
    await gate.entered.wait()
    sweeper = _Sweeper._by_loop[asyncio.get_running_loop()]
    assert len(sweeper.keepers) == 2
    assert sweeper.period == pytest.approx(0.05)  # a sixth of the shortest lease
    long_lease = (await storage.get_saga(long_id)).lease_expires_at
    await asyncio.sleep(0.9)  # three short leases: only renewals keep the short one
    assert (await storage.get_saga(short_id)).lease_owner is not None
    assert await storage.get_sagas_for_recovery(10) == []
    assert (await storage.get_saga(long_id)).lease_expires_at == long_lease  # not stale: untouched
    gate.release.set()
    assert await long_run is SagaStatus.COMPLETED
    assert await short_run is SagaStatus.COMPLETED
    assert not sweeper.keepers
    await asyncio.sleep(0.1)  # the next tick finds nothing running and stops the timer
    assert asyncio.get_running_loop() not in _Sweeper._by_loop


def _child_owner(queue: object) -> None:
    from sagakit.storage.run import new_owner_id

    queue.put(new_owner_id())  # type: ignore[attr-defined]


def test_owner_ids_are_unique_and_a_forked_child_draws_its_own() -> None:
    import multiprocessing

    from sagakit.storage.run import new_owner_id

    ids = {new_owner_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    mine = new_owner_id()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_owner, args=(queue,))
    child.start()
    theirs = queue.get(timeout=30)
    child.join(30)
    assert theirs.rsplit("-", 1)[0] != mine.rsplit("-", 1)[0]  # another process, another prefix


async def test_a_run_whose_renewal_stalls_past_its_lease_starts_no_more_step_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Compensation retries write nothing between attempts, so only the lease's renewals keep
    the run entitled to retry. When a renewal hangs (a database lock, say) past the lease,
    another worker may claim the saga: the run must not start another attempt."""
    storage, script = MemorySagaStorage(), Script()
    script.fail("StepC", "act", RuntimeError("boom"))
    script.always("StepB", "compensate", RuntimeError("payment service down"))
    stalled = asyncio.Event()

    async def hangs(self: object, lease_seconds: float) -> None:
        stalled.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(type(await _a_run(storage)), "renew_lease", hangs)
    saga_id = uuid.uuid4()
    txn = transaction(ThreeStepSaga(), script, storage, saga_id=saga_id, lease_seconds=0.3,
                      compensation_retry_count=5, compensation_retry_delay=0.4)
    with pytest.raises(SagaLeaseLostError) as caught:
        await txn.run()
    assert stalled.is_set()
    assert caught.value.step_name == "StepB"
    # The first attempt ran under a fresh lease; the retries would have started after it ran out.
    assert script.count("StepB", "compensate") == 1
    assert script.count("StepA", "compensate") == 0
    state = await storage.get_saga(saga_id)
    assert state.status is SagaStatus.COMPENSATING  # left for recovery, nothing recorded
    assert [e.step_name for e in await storage.get_step_history(saga_id)] == [
        "StepA", "StepB", "StepC"]


async def test_an_adopted_lease_counts_from_when_the_claim_was_sent() -> None:
    """A worker's claim may wait (for a queue's lock, for the other claims of its poll) before
    the run adopts it: the run must not believe its lease lasts longer than the stored one."""
    import time

    storage = MemorySagaStorage()
    saga_id = uuid.uuid4()
    await storage.create_saga(saga_id, ThreeStepSaga.name, {})
    sent = time.monotonic()
    [state] = await storage.claim_due("w", limit=1, lease_seconds=10.0)
    await asyncio.sleep(0.05)  # time passes before the run adopts it
    async with storage.create_run() as run:
        run.adopt(state, 10.0, sent=sent)
        assert run.lease_until == sent + 10.0
        late = uuid.uuid4()
        await storage.create_saga(late, ThreeStepSaga.name, {})
    async with storage.create_run() as other:
        [again] = await storage.claim_due("w2", limit=1, lease_seconds=10.0)
        before = time.monotonic()
        other.adopt(again, 10.0)  # without ``sent``: from now
        assert other.lease_until >= before + 10.0
