"""Contract: submitted sagas and queues. ``submit`` stores a PENDING saga in a queue in one
commit; ``claim_queued`` hands a queue's due sagas to workers, highest priority then oldest
first, within the queue's limits (concurrency, per-key concurrency, rate) as they stand in the
storage; queue settings are kept by ``set_queue``/``get_queues``/``delete_queue``."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import pytest

from sagakit.queue import QueueSettings
from sagakit.records import SagaAction, SagaStatus, SagaStepStatus
from tests.contract.support import (
    LONG_LEASE,
    NAME,
    SHORT_LEASE,
    create,
    new_id,
    tick,
    wait_for_expiry,
)

Q = "orders"


async def submit(storage: Any, *, queue: str = Q, key: str | None = None, priority: int = 0,
                 name: str = NAME, **options: Any) -> UUID:
    saga_id = new_id()
    assert await storage.submit(saga_id, name, {"n": 0}, queue=queue, concurrency_key=key,
                                priority=priority, **options)
    await tick()  # distinct created_at: "oldest first" is unambiguous
    return saga_id


async def claim(storage: Any, owner: str = "w", queue: str = Q, limit: int = 10,
                lease: float = LONG_LEASE, **options: Any) -> list[Any]:
    return await storage.claim_queued(owner, queue, limit=limit, lease_seconds=lease, **options)


def ids(states: list[Any]) -> set[UUID]:
    return {s.saga_id for s in states}


async def finish(storage: Any, state: Any, status: SagaStatus = SagaStatus.COMPLETED) -> None:
    """Carry on under a claimed lease and end the saga (which frees its slot)."""
    async with storage.create_run() as run:
        run.adopt(state, LONG_LEASE)
        await run.log_step(state.saga_id, "Reserve", SagaAction.ACT, SagaStepStatus.COMPLETED)
        await run.update_status(state.saga_id, status)
        await run.commit()


async def test_submit_stores_a_pending_unleased_saga_in_its_queue(storage: Any) -> None:
    saga_id = new_id()
    created = await storage.submit(saga_id, NAME, {"order": "o-1"}, queue=Q,
                                   concurrency_key="customer-7", priority=5, fingerprint="f" * 16)
    assert created is True
    state = await storage.get_saga(saga_id)
    assert (state.status, state.version, state.recovery_attempts) == (SagaStatus.PENDING, 1, 0)
    assert (state.queue, state.concurrency_key, state.priority) == (Q, "customer-7", 5)
    assert state.context == {"order": "o-1"}
    assert state.fingerprint == "f" * 16
    assert state.lease_owner is None
    assert state.lease_expires_at is None
    assert state.deadline_at is None
    assert await storage.get_step_history(saga_id) == []


async def test_submit_of_an_existing_id_writes_nothing(storage: Any) -> None:
    saga_id = await submit(storage)
    before = await storage.get_saga(saga_id)
    assert await storage.submit(saga_id, NAME, {"n": 99}, queue="other") is False
    assert await storage.get_saga(saga_id) == before


async def test_submit_with_a_deadline_stores_when_it_passes(storage: Any) -> None:
    saga_id = await submit(storage, deadline_seconds=3600.0)
    state = await storage.get_saga(saga_id)
    assert state.deadline_at is not None
    assert state.created_at is not None
    assert 3590 < (state.deadline_at - state.created_at).total_seconds() < 3610


async def test_recovery_never_sees_submitted_sagas_and_queues_never_see_in_process_ones(
    storage: Any,
) -> None:
    queued = await submit(storage)
    in_process = await create(storage)  # PENDING, no queue: recovery's
    assert await storage.get_sagas_for_recovery(10) == [in_process]
    assert ids(await storage.claim_due("r", limit=10, lease_seconds=LONG_LEASE)) == {in_process}
    assert ids(await claim(storage)) == {queued}


async def test_claims_highest_priority_first_then_oldest_and_only_from_its_queue(
    storage: Any,
) -> None:
    low_old = await submit(storage, priority=0)
    high = await submit(storage, priority=10)
    low_new = await submit(storage, priority=0)
    other = await submit(storage, queue="emails", priority=100)
    first = await claim(storage, limit=2)
    assert [s.saga_id for s in first] == [high, low_old]
    for state in first:
        assert state.status is SagaStatus.RUNNING
        assert state.lease_owner == "w"
        assert state.lease_expires_at is not None
        assert (state.version, state.recovery_attempts) == (2, 0)  # a first run, no recovery
        assert state == await storage.get_saga(state.saga_id)
    assert [s.saga_id for s in await claim(storage, "w2")] == [low_new]
    assert await claim(storage, "w3") == []
    assert (await storage.get_saga(other)).status is SagaStatus.PENDING


async def test_the_queue_limit_counts_running_sagas_of_every_worker(storage: Any) -> None:
    await storage.set_queue(QueueSettings(Q, concurrency=2))
    submitted = [await submit(storage) for _ in range(5)]
    first = await claim(storage, "w1", limit=1)
    second = await claim(storage, "w2", limit=10)
    assert len(first) == 1
    assert len(second) == 1
    assert await claim(storage, "w3") == []
    await finish(storage, first[0])  # a slot frees
    third = await claim(storage, "w3")
    assert ids(third) == {submitted[2]}
    assert await claim(storage, "w4") == []
    # Other queues are not limited by this one.
    extra = await submit(storage, queue="emails")
    assert ids(await claim(storage, queue="emails")) == {extra}


async def test_a_compensating_saga_holds_its_slot_and_a_waiting_one_does_not(
    storage: Any,
) -> None:
    await storage.set_queue(QueueSettings(Q, concurrency=1))
    await submit(storage)
    await submit(storage)
    [state] = await claim(storage)
    async with storage.create_run() as run:
        run.adopt(state, LONG_LEASE)
        await run.update_status(state.saga_id, SagaStatus.COMPENSATING)
        await run.commit()
        assert await claim(storage, "w2") == []  # compensating under a live lease: running
        await run.log_step(state.saga_id, "Ship", SagaAction.ACT, SagaStepStatus.RETRYING,
                           attempt=1)
        await run.wait(state.saga_id, 60.0, release=True)  # a durable wait: WAITING, released
        await run.commit()
    assert len(await claim(storage, "w2")) == 1


async def test_an_interrupted_saga_frees_its_slot_when_its_lease_expires(storage: Any) -> None:
    await storage.set_queue(QueueSettings(Q, concurrency=1))
    first = await submit(storage)
    second = await submit(storage)
    [state] = await claim(storage, "dead-worker", lease=SHORT_LEASE)
    assert state.saga_id == first
    assert await claim(storage, "w") == []
    await wait_for_expiry()  # the worker died: its lease ran out
    [again] = await claim(storage, "w")
    # The interrupted saga is older, so it goes first, and its claim counts an attempt.
    assert again.saga_id == first
    assert (again.lease_owner, again.recovery_attempts, again.status) == (
        "w", 1, SagaStatus.RUNNING)
    assert (await storage.get_saga(second)).status is SagaStatus.PENDING


async def test_the_key_limit_holds_per_key_and_keyless_sagas_pass(storage: Any) -> None:
    await storage.set_queue(QueueSettings(Q, key_concurrency=1))
    a1 = await submit(storage, key="A")
    a2 = await submit(storage, key="A")
    b1 = await submit(storage, key="B")
    free = await submit(storage)
    a3 = await submit(storage, key="A")
    assert ids(await claim(storage)) == {a1, b1, free}
    assert await claim(storage, "w2") == []
    [state] = [await storage.get_saga(a1)]
    await finish(storage, state, SagaStatus.FAILED)
    assert ids(await claim(storage, "w2")) == {a2}
    assert (await storage.get_saga(a3)).status is SagaStatus.PENDING


async def test_key_and_queue_limits_together(storage: Any) -> None:
    await storage.set_queue(QueueSettings(Q, concurrency=2, key_concurrency=2))
    for _ in range(3):
        await submit(storage, key="A")
    await submit(storage, key="B")
    assert len(await claim(storage)) == 2
    assert await claim(storage, "w2") == []


async def test_the_rate_limit_lets_a_burst_through_then_refills(storage: Any) -> None:
    await storage.set_queue(QueueSettings(Q, rate=0.001, burst=2))  # one more start in ~17 min
    for _ in range(4):
        await submit(storage)
    assert len(await claim(storage)) == 2
    assert await claim(storage, "w2") == []
    await storage.set_queue(QueueSettings(Q, rate=50.0, burst=1))
    await asyncio.sleep(0.1)  # >= 5 starts' worth, capped by the bucket of 1
    assert len(await claim(storage, "w3")) == 1


async def test_a_due_waiting_saga_is_claimed_again_without_a_recovery_attempt(
    storage: Any,
) -> None:
    await submit(storage)
    [state] = await claim(storage)
    async with storage.create_run() as run:
        run.adopt(state, LONG_LEASE)
        await run.log_step(state.saga_id, "Ship", SagaAction.ACT, SagaStepStatus.RETRYING,
                           attempt=1)
        await run.wait(state.saga_id, SHORT_LEASE, release=True)
        await run.commit()
    assert await claim(storage, "w2") == []  # not due yet
    await wait_for_expiry()
    [again] = await claim(storage, "w2")
    assert (again.saga_id, again.status, again.recovery_attempts) == (
        state.saga_id, SagaStatus.RUNNING, 0)


async def test_claims_only_the_named_sagas_and_within_the_attempt_limit(storage: Any) -> None:
    other = await submit(storage, name="refund")
    mine = await submit(storage)
    assert ids(await claim(storage, saga_names=frozenset({"refund"}), lease=SHORT_LEASE)) == {
        other}
    await wait_for_expiry()  # ``other`` is interrupted: its next claim is a recovery attempt
    assert ids(await claim(storage, "w2", saga_names=frozenset({"refund"}),
                           lease=SHORT_LEASE)) == {other}
    await wait_for_expiry()  # interrupted again, after one recovery attempt
    assert ids(await claim(storage, "w3", max_recovery_attempts=0)) == {mine}
    assert ids(await claim(storage, "w4", max_recovery_attempts=1)) == {other}


async def test_finished_and_parked_sagas_are_never_claimed(storage: Any) -> None:
    await submit(storage)
    [state] = await claim(storage)
    await finish(storage, state, SagaStatus.PARKED)
    assert await claim(storage, "w2") == []


async def test_queue_settings_are_kept_replaced_and_deleted(storage: Any) -> None:
    assert await storage.get_queues() == []
    orders = QueueSettings(Q, concurrency=3, key_concurrency=1, rate=2.5, burst=5)
    await storage.set_queue(orders)
    await storage.set_queue(QueueSettings("emails"))
    assert await storage.get_queues() == [QueueSettings("emails"), orders]
    await storage.set_queue(QueueSettings(Q, concurrency=4))
    assert await storage.get_queues() == [QueueSettings("emails"), QueueSettings(Q, concurrency=4)]
    assert await storage.delete_queue("emails") is True
    assert await storage.delete_queue("emails") is False
    assert await storage.get_queues() == [QueueSettings(Q, concurrency=4)]


async def test_queue_counts_by_status(storage: Any) -> None:
    for _ in range(3):
        await submit(storage)
    await submit(storage, queue="emails")
    await create(storage)  # in-process: in no queue
    [state] = await claim(storage, limit=1)
    await finish(storage, state)
    assert await storage.queue_counts() == {
        Q: {SagaStatus.PENDING: 2, SagaStatus.COMPLETED: 1},
        "emails": {SagaStatus.PENDING: 1},
    }


async def test_bad_submit_options_are_refused_before_anything_is_written(storage: Any) -> None:
    for options, option in (({"queue": "no spaces"}, "queue"),
                            ({"queue": Q, "concurrency_key": ""}, "concurrency_key"),
                            ({"queue": Q, "priority": 2**31}, "priority")):
        saga_id = new_id()
        with pytest.raises(ValueError, match=option):
            await storage.submit(saga_id, NAME, {"n": 0}, **options)
        assert await storage.queue_counts() == {}
