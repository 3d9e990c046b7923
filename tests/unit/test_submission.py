"""Submitted sagas on the memory storage: submit's checks, workers serving queues within their
limits, fairness between queues, wake-ups, and the handle's outcome and step stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sagakit import MemorySagaStorage, RecoveryWorker, SagaStatus, bootstrap
from sagakit.exceptions import SagaDefinitionError, SagaSerializationError, SagaStorageError
from sagakit.queue import QueueSettings, pick, refill
from sagakit.records import SagaStepStatus
from tests.unit.support import Ctx, OneStepSaga, Script, ThreeStepSaga


@contextlib.asynccontextmanager
async def running(*workers: RecoveryWorker) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(w.run(install_signal_handlers=False)) for w in workers]
    try:
        yield
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)


def worker(storage: Any, script: Script, **options: Any) -> RecoveryWorker:
    options.setdefault("poll_interval", 0.01)
    return RecoveryWorker(storage, [ThreeStepSaga, OneStepSaga], script.container, **options)


class Journal:
    """Counts the steps running at each moment, per queue and per key, from the steps' own
    start and end (a hook on StepA's act that holds it open for a moment)."""

    def __init__(self, script: Script, hold: float = 0.01) -> None:
        self.now: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.order: list[str] = []
        self.hold = hold
        script.hook("StepA", "act", self)

    async def __call__(self, handler: Any, context: Ctx) -> None:
        for label in {context.order_id.split("/")[0], context.order_id}:
            self.now[label] = self.now.get(label, 0) + 1
            self.most[label] = max(self.most.get(label, 0), self.now[label])
        self.order.append(context.order_id)
        try:
            await asyncio.sleep(self.hold)
        finally:
            for label in {context.order_id.split("/")[0], context.order_id}:
                self.now[label] -= 1


async def test_a_submitted_saga_is_stored_pending_and_a_worker_runs_it() -> None:
    storage, script = MemorySagaStorage(), Script()
    handle = await ThreeStepSaga().submit(Ctx("o-1"), storage=storage, queue="orders",
                                          concurrency_key="customer-1", priority=3)
    state = await handle.state()
    assert (state.status, state.queue, state.concurrency_key, state.priority) == (
        SagaStatus.PENDING, "orders", "customer-1", 3)
    assert script.calls == []  # nothing ran in the submitting process
    async with running(worker(storage, script, queues=["orders"])):
        final = await asyncio.wait_for(handle.outcome(), 10)
    assert final.status is SagaStatus.COMPLETED
    assert final.context["trail"] == ["StepA", "StepB", "StepC"]
    assert script.acts() == ["StepA", "StepB", "StepC"]
    assert final.recovery_attempts == 0  # a first run is no recovery


async def test_the_handle_streams_each_step_entry_once_until_the_saga_ends() -> None:
    storage, script = MemorySagaStorage(), Script()
    script.fail("StepC", "act", ValueError("no stock"))
    handle = await ThreeStepSaga().submit(Ctx("o-1"), storage=storage)
    entries = []
    async with running(worker(storage, script)):
        async with asyncio.timeout(10):
            async for entry in handle.steps():
                entries.append((entry.step_name, entry.action.value, entry.status))
    assert entries == [
        ("StepA", "act", SagaStepStatus.COMPLETED), ("StepB", "act", SagaStepStatus.COMPLETED),
        ("StepC", "act", SagaStepStatus.FAILED),
        ("StepB", "compensate", SagaStepStatus.COMPENSATED),
        ("StepA", "compensate", SagaStepStatus.COMPENSATED),
    ]
    assert (await handle.state()).status is SagaStatus.FAILED


async def test_outcome_times_out_while_no_worker_serves_the_queue() -> None:
    handle = await OneStepSaga().submit(Ctx(), storage=MemorySagaStorage(), queue="nobody")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await handle.outcome()
    assert (await handle.state()).status is SagaStatus.PENDING


@pytest.mark.parametrize(("options", "message"), [
    ({"queue": "no spaces"}, "queue"),
    ({"queue": ""}, "queue"),
    ({"concurrency_key": ""}, "concurrency_key"),
    ({"concurrency_key": "x" * 256}, "concurrency_key"),
    ({"concurrency_key": 7}, "concurrency_key"),
    ({"priority": 1.5}, "priority"),
    ({"priority": 2**31}, "priority"),
])
async def test_bad_options_are_refused_before_anything_is_written(
    options: dict[str, Any], message: str,
) -> None:
    storage = MemorySagaStorage()
    with pytest.raises(ValueError, match=message):
        await ThreeStepSaga().submit(Ctx(), storage=storage, **options)
    assert await storage.list_sagas() == []


async def test_an_unstorable_context_names_the_saga_and_writes_nothing() -> None:
    storage = MemorySagaStorage()
    with pytest.raises(SagaSerializationError, match="ThreeStepSaga"):
        await ThreeStepSaga().submit(Ctx(trail=[object()]), storage=storage)  # type: ignore[list-item]
    assert await storage.list_sagas() == []


async def test_submitting_an_id_again_follows_the_stored_saga() -> None:
    storage = MemorySagaStorage()
    first = await ThreeStepSaga().submit(Ctx("o-1"), storage=storage, queue="orders")
    again = await ThreeStepSaga().submit(Ctx("o-2"), storage=storage, saga_id=first.saga_id)
    assert (again.created, again.queue) == (False, "orders")
    assert (await again.state()).context["order_id"] == "o-1"
    with pytest.raises(SagaDefinitionError, match="nothing was written"):
        await OneStepSaga().submit(Ctx(), storage=storage, saga_id=first.saga_id)


async def test_a_storage_without_submit_is_refused_clearly() -> None:
    class Seedish:  # the seed's protocol: no submit()
        pass

    with pytest.raises(SagaStorageError, match="cannot take submitted sagas"):
        await ThreeStepSaga().submit(Ctx(), storage=Seedish())  # type: ignore[arg-type]


async def test_the_mediator_submits_the_saga_bound_to_the_context() -> None:
    storage, script = MemorySagaStorage(), Script()
    mediator = bootstrap(di_container=script.container, saga_storage=storage,
                         sagas_mapper=lambda m: m.bind(Ctx, ThreeStepSaga))
    handle = await mediator.submit(Ctx("o-9"), queue="orders")
    assert handle.saga_name == ThreeStepSaga.name
    assert (await handle.state()).queue == "orders"


async def test_a_worker_serves_only_its_queues() -> None:
    storage, script = MemorySagaStorage(), Script()
    mine = await OneStepSaga().submit(Ctx("a"), storage=storage, queue="a")
    other = await OneStepSaga().submit(Ctx("b"), storage=storage, queue="b")
    default = await OneStepSaga().submit(Ctx("d"), storage=storage)
    async with running(worker(storage, script, queues=["a"])):
        await asyncio.wait_for(mine.outcome(), 10)
        await asyncio.sleep(0.05)
    assert (await other.state()).status is SagaStatus.PENDING
    assert (await default.state()).status is SagaStatus.PENDING
    async with running(worker(storage, script)):  # the default queue by default
        await asyncio.wait_for(default.outcome(), 10)
    assert (await other.state()).status is SagaStatus.PENDING


async def test_workers_together_keep_the_queue_and_key_limits() -> None:
    storage, script = MemorySagaStorage(), Script()
    await storage.set_queue(QueueSettings("q", concurrency=3, key_concurrency=1))
    journal = Journal(script)
    handles = [await OneStepSaga().submit(Ctx(f"q/customer-{i % 4}"), storage=storage,
                                          queue="q", concurrency_key=f"customer-{i % 4}")
               for i in range(24)]
    workers = [worker(storage, script, queues=["q"], concurrency=4) for _ in range(3)]
    async with running(*workers):
        for handle in handles:
            assert (await asyncio.wait_for(handle.outcome(), 30)).status is SagaStatus.COMPLETED
    assert journal.most["q"] == 3  # reached, never passed
    assert max(n for label, n in journal.most.items() if "customer" in label) == 1


async def test_a_flood_in_one_queue_does_not_starve_another() -> None:
    storage, script = MemorySagaStorage(), Script()
    journal = Journal(script)
    for i in range(40):
        await OneStepSaga().submit(Ctx(f"flood/{i}"), storage=storage, queue="flood")
    small = [await OneStepSaga().submit(Ctx(f"small/{i}"), storage=storage, queue="small")
             for i in range(2)]
    async with running(worker(storage, script, queues=["flood", "small"], concurrency=2)):
        for handle in small:
            await asyncio.wait_for(handle.outcome(), 10)
    started_before = max(journal.order.index(f"small/{i}") for i in range(2))
    assert started_before < 10  # both ran among the first few, not after the 40


async def test_a_submit_wakes_an_idle_worker_at_once() -> None:
    storage, script = MemorySagaStorage(), Script()
    idle = worker(storage, script, poll_interval=30.0)  # its next poll is far away
    async with running(idle):
        await asyncio.sleep(0.05)  # the worker has polled and found nothing
        handle = await OneStepSaga().submit(Ctx(), storage=storage)
        final = await asyncio.wait_for(handle.outcome(poll=0.01), 10)  # well before 30 s
    assert final.status is SagaStatus.COMPLETED


async def test_with_wake_ups_an_idle_worker_polls_less_often() -> None:
    storage, script = MemorySagaStorage(), Script()
    w = worker(storage, script, poll_interval=1.0)
    assert w.max_idle_poll == 5.0
    async with running(w):
        await asyncio.sleep(0.05)
        assert w.max_idle_poll == 15.0  # woken for new work: polls only for the interrupted
    assert w.max_idle_poll == 5.0
    given = worker(storage, script, poll_interval=1.0, max_idle_poll=2.0)
    async with running(given):
        await asyncio.sleep(0.05)
        assert given.max_idle_poll == 2.0  # a ceiling given is kept


async def test_an_idle_worker_takes_a_dead_workers_saga_over_without_waiting_to_poll() -> None:
    storage, script = MemorySagaStorage(), Script()
    handle = await OneStepSaga().submit(Ctx(), storage=storage)
    # Its first poll finds the saga held by a live worker; its next poll is 30 s away.
    idle = worker(storage, script, poll_interval=30.0, failover_poll=0.05)
    async with storage.liveness() as gone:
        [state] = await storage.claim_queued(gone.owner, "default", limit=1, lease_seconds=3600)
        async with running(idle):
            await asyncio.sleep(0.2)
            assert (await handle.state()).lease_owner == gone.owner
            await gone.__aexit__(None, None, None)  # the holder dies
            final = await asyncio.wait_for(handle.outcome(poll=0.01), 10)  # its session woke it
            assert idle.liveness is not None
            assert idle.liveness.live
            assert final.lease_owner is None
    assert final.status is SagaStatus.COMPLETED
    assert state.lease_owner.startswith("~")
    plain = worker(storage, script, liveness=False)
    async with running(plain):
        await asyncio.sleep(0.05)
        assert plain.liveness is None
        assert not plain.owner.startswith("~")


def test_idle_polls_back_off_to_the_ceiling_and_work_resets_them() -> None:
    w = RecoveryWorker(MemorySagaStorage(), [OneStepSaga], poll_interval=1.0, max_idle_poll=4.0)
    assert w.poll_wait() == 1.0
    w._idle_polls = 50
    assert 3.2 <= w.poll_wait() <= 4.8  # the ceiling, +-20%
    w._idle_polls = 0
    assert w.poll_wait() == 1.0
    with pytest.raises(ValueError, match="max_idle_poll"):
        RecoveryWorker(MemorySagaStorage(), [OneStepSaga], poll_interval=1.0, max_idle_poll=0.5)
    with pytest.raises(ValueError, match="failover_poll"):
        RecoveryWorker(MemorySagaStorage(), [OneStepSaga], failover_poll=0)
    with pytest.raises(ValueError, match="queues"):
        RecoveryWorker(MemorySagaStorage(), [OneStepSaga], queues=["bad name"])


# -- the pure decisions ------------------------------------------------------------------------

def test_pick_keeps_order_and_every_limit() -> None:
    limits = QueueSettings("q", concurrency=5, key_concurrency=2)
    candidates = [(1, "a"), (2, "a"), (3, "a"), (4, None), (5, "b"), (6, "b"), (7, "c")]
    assert pick(limits, candidates, want=10, running=0, running_by_key={}, tokens=9e9) == [
        1, 2, 4, 5, 6]
    assert pick(limits, candidates, want=10, running=3, running_by_key={"a": 1},
                tokens=9e9) == [1, 4]
    assert pick(limits, candidates, want=2, running=0, running_by_key={}, tokens=9e9) == [1, 2]
    assert pick(limits, candidates, want=10, running=0, running_by_key={}, tokens=1.9) == [1]
    assert pick(None, candidates, want=3, running=99, running_by_key={"a": 99},
                tokens=float("inf")) == [1, 2, 3]
    assert pick(limits, candidates, want=10, running=7, running_by_key={}, tokens=9e9) == []


def test_refill_fills_the_bucket_at_the_rate_and_never_past_it() -> None:
    limits = QueueSettings("q", rate=2.0, burst=4)
    assert refill(limits, None, None, 100.0) == 4  # never used: full
    assert refill(limits, 0.0, 100.0, 101.0) == 2.0
    assert refill(limits, 1.0, 100.0, 200.0) == 4
    assert refill(limits, 1.0, 100.0, 50.0) == 1.0  # the clock went back: nothing
    assert refill(QueueSettings("q"), 0.0, 0.0, 0.0) == float("inf")
    assert QueueSettings("q", rate=0.5).bucket == 1.0


@pytest.mark.parametrize(("options", "message"), [
    ({"concurrency": 0}, "concurrency"), ({"key_concurrency": -1}, "key_concurrency"),
    ({"rate": 0}, "rate"), ({"rate": float("nan")}, "rate"), ({"burst": 2}, "burst needs"),
    ({"rate": 1, "burst": 0.5}, "burst"),
])
def test_queue_settings_are_checked_when_made(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QueueSettings("q", **options)
    with pytest.raises(ValueError, match="name"):
        QueueSettings("a queue")
