"""Contract: a run's start() and claim() take a saga's lease; a live lease keeps others out."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sagakit.exceptions import SagaBusyError, SagaNotFoundError
from sagakit.records import SagaStatus
from tests.contract.support import (
    LONG_LEASE,
    NAME,
    SHORT_LEASE,
    assert_writes_nothing,
    create,
    key_fields,
    new_id,
    snapshot,
    wait_for_expiry,
)

LEFT_ALONE = [
    pytest.param(SagaStatus.COMPLETED, id="completed"),
    pytest.param(SagaStatus.FAILED, id="failed"),
    pytest.param(SagaStatus.PARKED, id="parked"),
]


async def claim(run: Any, saga_id: Any, **options: Any) -> Any:
    options.setdefault("lease_seconds", LONG_LEASE)
    return await run.claim(saga_id, **options)


async def start(run: Any, saga_id: Any, context: dict[str, Any] | None = None) -> Any:
    return await run.start(
        saga_id, NAME, {"n": 0} if context is None else context,
        fingerprint="fp-1", lease_seconds=LONG_LEASE,
    )


async def test_start_of_a_new_id_creates_it_running_and_leased(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as run:
        state, created = await run.start(
            saga_id, NAME, {"n": 1}, fingerprint="fp-1", lease_seconds=LONG_LEASE
        )
        assert created is True
        stored, history = await snapshot(storage, saga_id)
        assert key_fields(state) == key_fields(stored)
        assert (stored.status, stored.context, stored.version) == (
            SagaStatus.RUNNING, {"n": 1}, 1,
        )
        assert stored.lease_owner == run.owner
        assert stored.lease_expires_at is not None
        assert stored.lease_expires_at.utcoffset() is not None
        assert stored.fingerprint == "fp-1"
        assert stored.recovery_attempts == 0
        assert history == []
        assert run.version == 1


async def test_start_of_an_existing_free_saga_claims_it(storage: Any) -> None:
    saga_id = await create(storage, {"stored": True}, status=SagaStatus.COMPENSATING)
    async with storage.create_run() as run:
        state, created = await start(run, saga_id, {"stored": False})
        assert created is False
        assert state.context == {"stored": True}
        assert state.status is SagaStatus.COMPENSATING
        assert state.recovery_attempts == 1
        assert state.lease_owner == run.owner
        assert state.version == 3
        assert key_fields(await storage.get_saga(saga_id)) == key_fields(state)
        assert run.version == state.version


async def test_start_of_an_existing_pending_saga_makes_it_running(storage: Any) -> None:
    saga_id = await create(storage)
    async with storage.create_run() as run:
        state, created = await start(run, saga_id)
    assert created is False
    assert (state.status, state.recovery_attempts) == (SagaStatus.RUNNING, 1)


@pytest.mark.parametrize("status", LEFT_ALONE)
async def test_start_of_a_terminal_or_parked_saga_returns_it_as_stored(
    storage: Any, status: SagaStatus
) -> None:
    saga_id = await create(storage, {"n": 9}, status=status)
    before = await snapshot(storage, saga_id)
    async with storage.create_run() as run:
        state, created = await start(run, saga_id)
        assert created is False
        assert key_fields(state) == key_fields(before[0])
        assert await snapshot(storage, saga_id) == before
    assert await snapshot(storage, saga_id) == before


async def test_claim_takes_the_lease_and_counts_an_attempt(storage: Any) -> None:
    saga_id = await create(storage, {"n": 3}, status=SagaStatus.RUNNING)
    async with storage.create_run() as run:
        state = await claim(run, saga_id)
        assert (state.status, state.context, state.recovery_attempts, state.version) == (
            SagaStatus.RUNNING, {"n": 3}, 1, 3,
        )
        assert state.lease_owner == run.owner
        assert key_fields(await storage.get_saga(saga_id)) == key_fields(state)
        assert run.version == state.version


async def test_claim_without_counting_an_attempt(storage: Any) -> None:
    saga_id = await create(storage, status=SagaStatus.RUNNING)
    await storage.set_recovery_attempts(saga_id, 2)
    async with storage.create_run() as run:
        state = await claim(run, saga_id, count_attempt=False)
    assert state.recovery_attempts == 2
    assert state.lease_owner == run.owner


async def test_claim_of_a_pending_saga_makes_it_running(storage: Any) -> None:
    saga_id = await create(storage)
    async with storage.create_run() as run:
        state = await claim(run, saga_id)
        assert state.status is SagaStatus.RUNNING
        assert (await storage.get_saga(saga_id)).status is SagaStatus.RUNNING


async def test_claim_of_an_unknown_id(storage: Any) -> None:
    async with storage.create_run() as run:
        with pytest.raises(SagaNotFoundError):
            await claim(run, new_id())


@pytest.mark.parametrize("status", LEFT_ALONE)
async def test_claim_of_a_terminal_or_parked_saga_returns_it_as_stored(
    storage: Any, status: SagaStatus
) -> None:
    saga_id = await create(storage, {"n": 4}, status=status)
    before = await snapshot(storage, saga_id)
    async with storage.create_run() as run:
        state = await claim(run, saga_id)
        assert key_fields(state) == key_fields(before[0])
        assert state.lease_owner is None
        assert await snapshot(storage, saga_id) == before
    assert await snapshot(storage, saga_id) == before


async def test_claim_of_a_parked_saga_with_allow_parked(storage: Any) -> None:
    saga_id = await create(storage, {"n": 5}, status=SagaStatus.PARKED)
    async with storage.create_run() as run:
        state = await claim(run, saga_id, allow_parked=True, count_attempt=False)
        assert state.lease_owner == run.owner
        assert state.version == 3
        assert state.context == {"n": 5}
        assert (await storage.get_saga(saga_id)).lease_owner == run.owner


@pytest.mark.parametrize("status", [SagaStatus.COMPLETED, SagaStatus.FAILED])
async def test_allow_parked_does_not_claim_terminal_sagas(
    storage: Any, status: SagaStatus
) -> None:
    saga_id = await create(storage, status=status)
    before = await snapshot(storage, saga_id)
    async with storage.create_run() as run:
        state = await claim(run, saga_id, allow_parked=True)
    assert state.lease_owner is None
    assert await snapshot(storage, saga_id) == before


@pytest.mark.parametrize("how", ["claim", "start"])
async def test_a_saga_leased_by_a_live_run_is_busy_and_nothing_is_written(
    storage: Any, how: str
) -> None:
    saga_id = new_id()
    async with storage.create_run() as holder, storage.create_run() as other:
        await start(holder, saga_id)
        await assert_writes_nothing(
            storage, saga_id, SagaBusyError,
            lambda: claim(other, saga_id) if how == "claim" else start(other, saga_id),
        )
        stored = await storage.get_saga(saga_id)
        assert (stored.lease_owner, stored.version, stored.recovery_attempts) == (
            holder.owner, 1, 0,
        )


async def test_busy_even_with_allow_parked_and_without_counting(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as holder, storage.create_run() as other:
        await start(holder, saga_id)
        await assert_writes_nothing(
            storage, saga_id, SagaBusyError,
            lambda: claim(other, saga_id, allow_parked=True, count_attempt=False),
        )


@pytest.mark.parametrize("how", ["claim", "start"])
async def test_a_saga_whose_lease_expired_can_be_taken(storage: Any, how: str) -> None:
    saga_id = new_id()
    async with storage.create_run() as holder, storage.create_run() as other:
        await holder.start(saga_id, NAME, {"n": 1}, fingerprint=None, lease_seconds=SHORT_LEASE)
        await wait_for_expiry()
        if how == "claim":
            state = await claim(other, saga_id)
        else:
            state, created = await start(other, saga_id)
            assert created is False
        assert state.lease_owner == other.owner
        assert (state.status, state.context, state.version, state.recovery_attempts) == (
            SagaStatus.RUNNING, {"n": 1}, 2, 1,
        )
        assert (await storage.get_saga(saga_id)).lease_owner == other.owner


async def test_concurrent_starts_of_one_new_id(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as first, storage.create_run() as second:
        results = await asyncio.gather(
            start(first, saga_id), start(second, saga_id), return_exceptions=True
        )
        started = [r for r in results if not isinstance(r, BaseException)]
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(started) == 1, results
        assert len(errors) == 1, results
        assert isinstance(errors[0], SagaBusyError), errors
        state, created = started[0]
        assert created is True
        winner = first if results[0] is started[0] else second

        stored = await storage.get_saga(saga_id)
        assert stored.lease_owner == winner.owner == state.lease_owner
        assert (stored.status, stored.version, stored.recovery_attempts) == (
            SagaStatus.RUNNING, 1, 0,
        )
        assert [s.saga_id for s in await storage.list_sagas()] == [saga_id]

