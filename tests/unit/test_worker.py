"""The recovery worker on the memory storage: what it picks up, backoff, parking, shutdown."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sagakit import (
    MemorySagaStorage,
    RecoveryOptions,
    RecoveryWorker,
    SagaMap,
    SagaStatus,
)
from tests.unit.support import Crash, Ctx, FourStepSaga, Gate, Script, ThreeStepSaga, transaction


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def _crash_after(saga: Any, script: Script, storage: Any, step: str, **options: Any) -> Any:
    script.fail(step, "act", Crash())
    txn = transaction(saga, script, storage, **options)
    with pytest.raises(Crash):
        async for _ in txn:
            pass
    return txn.saga_id


def _worker(storage: Any, script: Script, **kwargs: Any) -> RecoveryWorker:
    return RecoveryWorker(storage, [ThreeStepSaga, FourStepSaga], script.container, **kwargs)


async def test_run_once_recovers_every_interrupted_saga_and_skips_finished_ones() -> None:
    storage, script = MemorySagaStorage(), Script()
    crashed = [await _crash_after(ThreeStepSaga(), script, storage, "StepB") for _ in range(3)]
    finished = transaction(ThreeStepSaga(), script, storage)
    await finished.run()
    script.calls.clear()
    worker = _worker(storage, script, concurrency=2)
    first = await worker.run_once()
    assert len(first) == 2  # one poll claims at most `concurrency` sagas
    outcomes = first + await worker.run_once()
    assert sorted(o.saga_id for o in outcomes) == sorted(crashed)
    assert all(o.status is SagaStatus.COMPLETED for o in outcomes)
    assert sorted(script.acts()) == sorted(["StepB", "StepC"] * 3)
    assert script.count("StepA", "act") == 0  # checkpointed steps never run again
    assert await _worker(storage, script).run_once() == []


async def test_a_saga_map_selects_definitions_and_unknown_names_are_left_alone() -> None:
    storage, script = MemorySagaStorage(), Script()
    four = await _crash_after(FourStepSaga(), script, storage, "StepC")
    three = await _crash_after(ThreeStepSaga(), script, storage, "StepC")
    untouched = await storage.get_saga(three)
    saga_map = SagaMap()
    saga_map.bind(Ctx, FourStepSaga)
    worker = RecoveryWorker(storage, saga_map, script.container)
    outcomes = {o.saga_id: o for o in await worker.run_once()}
    assert outcomes[four].status is SagaStatus.COMPLETED
    assert three not in outcomes  # no definition here: not even claimed
    assert await storage.get_saga(three) == untouched


async def test_a_saga_leased_by_a_live_run_is_not_listed_nor_touched() -> None:
    storage, script = MemorySagaStorage(), Script()
    gate = Gate()
    script.hook("StepB", "act", gate)
    live = asyncio.create_task(transaction(ThreeStepSaga(), script, storage).run())
    await gate.entered.wait()
    assert await _worker(storage, script).run_once() == []
    gate.release.set()
    assert await live is SagaStatus.COMPLETED
    assert script.count("StepB", "act") == 1


async def test_failed_attempts_back_off_and_end_parked() -> None:
    clock = FakeClock()
    storage, script = MemorySagaStorage(clock=clock), Script()
    script.fail("StepC", "act", RuntimeError("boom"))
    script.always("StepA", "compensate", RuntimeError("still down"))
    txn = transaction(ThreeStepSaga(), script, storage)
    with pytest.raises(RuntimeError):
        await txn.run()
    assert (await storage.get_saga(txn.saga_id)).status is SagaStatus.COMPENSATING
    options = RecoveryOptions(max_recovery_attempts=2, backoff=10.0, backoff_max=15.0,
                              retry=txn.retry)
    worker = _worker(storage, script, options=options)
    waits = []
    for _ in range(2):  # two attempts allowed
        outcomes = await worker.run_once()
        assert [o.status for o in outcomes] == [SagaStatus.COMPENSATING]
        state = await storage.get_saga(txn.saga_id)
        assert state.next_attempt_at is not None
        waits.append(state.next_attempt_at.timestamp() - clock.now)
        assert await worker.run_once() == []  # backing off: not listed yet
        clock.now += 100
    assert waits == [10.0, 15.0]  # 10 * 2**(n-1), capped at 15
    outcomes = await worker.run_once()
    assert [o.status for o in outcomes] == [SagaStatus.PARKED]
    assert await worker.run_once() == []  # parked: never retried automatically
    assert script.count("StepB", "compensate") == 1  # compensated once, never again


async def test_stop_lets_the_saga_in_hand_reach_its_next_checkpoint() -> None:
    storage, script = MemorySagaStorage(), Script()
    saga_id = await _crash_after(FourStepSaga(), script, storage, "StepA")
    gate = Gate()
    script.hook("StepB", "act", gate)
    worker = _worker(storage, script, poll_interval=0.01)
    running = asyncio.create_task(worker.run(install_signal_handlers=False))
    await gate.entered.wait()
    worker.stop()
    gate.release.set()
    await running
    state = await storage.get_saga(saga_id)
    assert state.status is SagaStatus.RUNNING
    assert state.lease_owner is None  # released for any worker to continue
    assert state.next_attempt_at is None  # a shutdown is not a failure: no backoff
    assert script.acts() == ["StepA", "StepA", "StepB"]  # B checkpointed, C not started
    history = [(e.step_name, e.status.value) for e in await storage.get_step_history(saga_id)]
    assert history == [("StepA", "COMPLETED"), ("StepB", "COMPLETED")]


async def test_run_polls_until_stopped() -> None:
    storage, script = MemorySagaStorage(), Script()
    worker = _worker(storage, script, poll_interval=0.01)
    running = asyncio.create_task(worker.run(install_signal_handlers=False))
    await asyncio.sleep(0.05)
    saga_id = await _crash_after(ThreeStepSaga(), script, storage, "StepB")
    for _ in range(200):
        if (await storage.get_saga(saga_id)).status is SagaStatus.COMPLETED:
            break
        await asyncio.sleep(0.01)
    worker.stop()
    await running
    assert (await storage.get_saga(saga_id)).status is SagaStatus.COMPLETED
    assert [o.saga_id for o in worker.outcomes] == [saga_id]


def test_concurrency_must_be_positive() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        RecoveryWorker(MemorySagaStorage(), [ThreeStepSaga], concurrency=0)


async def test_a_slow_saga_does_not_hold_the_other_slots() -> None:
    storage, script = MemorySagaStorage(), Script()
    slow = await _crash_after(FourStepSaga(), script, storage, "StepA", context=Ctx("slow"))
    quick = [await _crash_after(ThreeStepSaga(), script, storage, "StepA") for _ in range(3)]
    gate = Gate()

    async def hold_the_slow_one(handler: Any, context: Ctx) -> None:
        if context.order_id == "slow":
            await gate(handler, context)

    script.hook("StepB", "act", hold_the_slow_one)
    worker = _worker(storage, script, concurrency=2, poll_interval=0.01)
    running = asyncio.create_task(worker.run(install_signal_handlers=False))
    await gate.entered.wait()
    for _ in range(500):  # every quick saga finishes while the slow one still holds a slot
        states = [await storage.get_saga(i) for i in quick]
        if all(s.status is SagaStatus.COMPLETED for s in states):
            break
        await asyncio.sleep(0.01)
    assert [s.status for s in states] == [SagaStatus.COMPLETED] * 3
    assert (await storage.get_saga(slow)).status is SagaStatus.RUNNING  # still in hand
    gate.release.set()
    for _ in range(500):
        if (await storage.get_saga(slow)).status is SagaStatus.COMPLETED:
            break
        await asyncio.sleep(0.01)
    worker.stop()
    await running
    final = [(await storage.get_saga(i)).status for i in [slow, *quick]]
    assert final == [SagaStatus.COMPLETED] * 4


def test_polls_back_off_while_they_fail_and_not_before() -> None:
    worker = RecoveryWorker(MemorySagaStorage(), [], poll_interval=0.5)
    assert worker.poll_wait() == 0.5
    waits = []
    for failures in range(1, 12):
        worker.failed_polls = failures
        waits.append(worker.poll_wait())
    for failures, wait in enumerate(waits, start=1):
        expected = min(0.5 * 2 ** (failures - 1), worker.max_backoff)
        assert expected * 0.8 <= wait <= expected * 1.2
    assert max(waits) <= worker.max_backoff * 1.2


class CountingStorage(MemorySagaStorage):
    """A memory storage that counts the claims of each kind."""

    def __init__(self) -> None:
        super().__init__()
        self.claims: dict[str, int] = {"due": 0, "queued": 0}

    async def claim_due(self, *args: Any, **kwargs: Any) -> Any:
        self.claims["due"] += 1
        return await super().claim_due(*args, **kwargs)

    async def claim_queued(self, *args: Any, **kwargs: Any) -> Any:
        self.claims["queued"] += 1
        return await super().claim_queued(*args, **kwargs)


async def test_a_busy_worker_does_not_ask_an_empty_source_at_every_refill() -> None:
    """Twelve interrupted sagas, two slots: each finished saga frees a slot that is refilled at
    once from recovery. The queue was empty at the first poll and rests for poll_interval (a
    minute here): not asked again at each refill; a wake-up (a submit) ends its rest."""
    storage, script = CountingStorage(), Script()
    backlog = [await _crash_after(ThreeStepSaga(), script, storage, "StepA") for _ in range(12)]
    worker = _worker(storage, script, concurrency=2, poll_interval=60)
    running = asyncio.create_task(worker.run(install_signal_handlers=False))
    try:
        for _ in range(500):
            states = [await storage.get_saga(i) for i in backlog]
            if all(s.status is SagaStatus.COMPLETED for s in states):
                break
            await asyncio.sleep(0.01)
        assert [s.status for s in states] == [SagaStatus.COMPLETED] * 12
        assert storage.claims["queued"] == 1
        assert storage.claims["due"] >= 6  # the refills, from the source that had work
        handle = await ThreeStepSaga().submit(Ctx("late"), storage=storage)
        final = await asyncio.wait_for(handle.outcome(), 10)  # woken: not a minute later
        assert final.status is SagaStatus.COMPLETED
        assert storage.claims["queued"] >= 2
    finally:
        worker.stop()
        await running
