"""Contract: get_sagas_for_recovery() and list_sagas()."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import pytest

from sagakit.records import SagaStatus
from tests.contract.support import (
    LONG_LEASE,
    NAME,
    SHORT_LEASE,
    create,
    new_id,
    tick,
    wait_for_expiry,
)

STALE_WAIT = 0.6  # never asserted as a duration: only "older than half of it" vs "just written"


async def recoverable(storage: Any, **options: Any) -> list[UUID]:
    options.setdefault("limit", 100)
    return list(await storage.get_sagas_for_recovery(**options))


async def create_in_order(storage: Any, count: int, **options: Any) -> list[UUID]:
    """``count`` sagas, each created (and so last updated) after the one before."""
    ids = []
    for _ in range(count):
        await tick()
        ids.append(await create(storage, **options))
    return ids


async def create_one_per_status(storage: Any) -> dict[SagaStatus, UUID]:
    return {status: await create(storage, status=status) for status in SagaStatus}


# -- get_sagas_for_recovery -------------------------------------------------------------------


async def test_recovery_lists_only_unfinished_statuses(storage: Any) -> None:
    ids = await create_one_per_status(storage)
    assert set(await recoverable(storage)) == {  # a WAITING one without next_attempt_at: due
        ids[SagaStatus.PENDING], ids[SagaStatus.RUNNING], ids[SagaStatus.COMPENSATING],
        ids[SagaStatus.WAITING],
    }


async def test_recovery_on_an_empty_storage(storage: Any) -> None:
    assert await recoverable(storage) == []


async def test_recovery_skips_sagas_leased_by_a_live_run(storage: Any) -> None:
    free = await create(storage, status=SagaStatus.RUNNING)
    leased = new_id()
    async with storage.create_run() as run:
        await run.start(leased, NAME, {}, fingerprint=None, lease_seconds=LONG_LEASE)
        assert await recoverable(storage) == [free]


async def test_recovery_includes_sagas_whose_lease_expired(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as run:
        await run.start(saga_id, NAME, {}, fingerprint=None, lease_seconds=SHORT_LEASE)
        await wait_for_expiry()
        assert (await storage.get_saga(saga_id)).lease_owner == run.owner  # still recorded
        assert await recoverable(storage) == [saga_id]


async def test_recovery_includes_released_sagas(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as run:
        await run.start(saga_id, NAME, {}, fingerprint=None, lease_seconds=LONG_LEASE)
        await run.release()
        assert await recoverable(storage) == [saga_id]


async def test_recovery_lists_least_recently_updated_first(storage: Any) -> None:
    first, second, third = await create_in_order(storage, 3)
    assert await recoverable(storage) == [first, second, third]

    await tick()
    await storage.update_context(first, {"touched": True})
    assert await recoverable(storage) == [second, third, first]

    await tick()
    await storage.update_status(second, SagaStatus.COMPENSATING)
    assert await recoverable(storage) == [third, first, second]


async def test_recovery_honours_the_limit(storage: Any) -> None:
    ids = await create_in_order(storage, 5)
    assert await recoverable(storage, limit=2) == ids[:2]
    assert await recoverable(storage, limit=5) == ids
    assert await recoverable(storage, limit=50) == ids


async def test_recovery_filters_by_saga_name(storage: Any) -> None:
    orders = await create_in_order(storage, 2, name="order")
    [payment] = await create_in_order(storage, 1, name="payment")

    assert await recoverable(storage, saga_name="order") == orders
    assert await recoverable(storage, saga_name="payment") == [payment]
    assert await recoverable(storage, saga_name="nothing") == []


async def test_recovery_honours_max_recovery_attempts(storage: Any) -> None:
    at_max, over_max, fresh = await create_in_order(storage, 3)
    await storage.set_recovery_attempts(at_max, 2)
    await storage.set_recovery_attempts(over_max, 3)

    listed = await recoverable(storage, max_recovery_attempts=2)
    assert set(listed) == {at_max, fresh}
    assert set(await recoverable(storage, max_recovery_attempts=3)) == {at_max, over_max, fresh}
    assert await recoverable(storage, max_recovery_attempts=0) == [fresh]


async def test_recovery_default_max_recovery_attempts_is_5(storage: Any) -> None:
    five, six = await create_in_order(storage, 2)
    await storage.set_recovery_attempts(five, 5)
    await storage.set_recovery_attempts(six, 6)
    assert await recoverable(storage) == [five]


async def test_recovery_counts_attempts_of_claims(storage: Any) -> None:
    saga_id = await create(storage, status=SagaStatus.RUNNING)
    for _ in range(2):
        async with storage.create_run() as run:
            await run.claim(saga_id, lease_seconds=LONG_LEASE)
    assert await recoverable(storage, max_recovery_attempts=2) == [saga_id]
    assert await recoverable(storage, max_recovery_attempts=1) == []


async def test_recovery_with_stale_after_seconds(storage: Any) -> None:
    saga_id = await create(storage, status=SagaStatus.RUNNING)
    assert await recoverable(storage, stale_after_seconds=60) == []
    assert await recoverable(storage, stale_after_seconds=None) == [saga_id]

    await asyncio.sleep(STALE_WAIT)
    fresh = await create(storage, status=SagaStatus.RUNNING)
    # ``saga_id`` has not been written for STALE_WAIT seconds; ``fresh`` just was.
    assert await recoverable(storage, stale_after_seconds=STALE_WAIT / 2) == [saga_id]
    assert await recoverable(storage) == [saga_id, fresh]


async def test_recovery_filters_combine(storage: Any) -> None:
    ids = await create_in_order(storage, 4, name="order")
    await create_in_order(storage, 2, name="payment")
    await storage.set_recovery_attempts(ids[0], 9)
    await storage.update_status(ids[1], SagaStatus.COMPLETED)

    assert await recoverable(storage, saga_name="order", max_recovery_attempts=5, limit=1) == [
        ids[2]
    ]


# -- list_sagas -------------------------------------------------------------------------------


async def ids_of(storage: Any, **options: Any) -> list[UUID]:
    return [state.saga_id for state in await storage.list_sagas(**options)]


async def test_list_sagas_newest_first(storage: Any) -> None:
    ids = await create_in_order(storage, 3)
    assert await ids_of(storage) == ids[::-1]

    await storage.update_context(ids[0], {"updated": True})  # newest means newest created
    assert await ids_of(storage) == ids[::-1]


async def test_list_sagas_returns_whole_states(storage: Any) -> None:
    saga_id = await create(storage, {"n": 1}, status=SagaStatus.RUNNING)
    [state] = await storage.list_sagas()
    stored = await storage.get_saga(saga_id)
    assert (state.saga_id, state.name, state.status, state.context, state.version) == (
        stored.saga_id, stored.name, stored.status, stored.context, stored.version,
    )


async def test_list_sagas_on_an_empty_storage(storage: Any) -> None:
    assert await storage.list_sagas() == []


@pytest.mark.parametrize(
    "statuses",
    [
        frozenset({SagaStatus.PARKED}),
        frozenset({SagaStatus.COMPLETED, SagaStatus.FAILED}),
        frozenset({SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.COMPENSATING,
                   SagaStatus.WAITING}),
        frozenset(SagaStatus),
        frozenset(),
    ],
    ids=["parked", "terminal", "unfinished", "all", "none"],
)
async def test_list_sagas_filters_by_status(
    storage: Any, statuses: frozenset[SagaStatus]
) -> None:
    ids = await create_one_per_status(storage)
    listed = await storage.list_sagas(statuses=statuses)
    assert {state.saga_id for state in listed} == {ids[status] for status in statuses}
    assert all(state.status in statuses for state in listed)


async def test_list_sagas_filters_by_name(storage: Any) -> None:
    orders = await create_in_order(storage, 2, name="order")
    payments = await create_in_order(storage, 2, name="payment")

    assert await ids_of(storage, saga_name="order") == orders[::-1]
    assert await ids_of(storage, saga_name="payment") == payments[::-1]
    assert await ids_of(storage, saga_name="nothing") == []


async def test_list_sagas_honours_the_limit(storage: Any) -> None:
    ids = await create_in_order(storage, 5)
    assert await ids_of(storage, limit=2) == ids[::-1][:2]
    assert await ids_of(storage, limit=50) == ids[::-1]


async def test_list_sagas_filters_combine(storage: Any) -> None:
    orders = await create_in_order(storage, 3, name="order", status=SagaStatus.COMPLETED)
    await create_in_order(storage, 2, name="order", status=SagaStatus.RUNNING)
    await create_in_order(storage, 2, name="payment", status=SagaStatus.COMPLETED)

    listed = await ids_of(
        storage, statuses=frozenset({SagaStatus.COMPLETED}), saga_name="order", limit=2
    )
    assert listed == [orders[2], orders[1]]
