"""``claim_due``: a worker's atomic batch claim of due sagas, and runs adopting those leases."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sagakit.exceptions import SagaConcurrencyError, SagaLeaseLostError
from sagakit.records import SagaAction, SagaStatus, SagaStepStatus
from tests.contract.support import (
    LONG_LEASE,
    NAME,
    SHORT_LEASE,
    create,
    tick,
    wait_for_expiry,
)


async def _claim(storage: Any, owner: str, limit: int = 10, **kwargs: Any) -> list[Any]:
    return await storage.claim_due(owner, limit=limit, lease_seconds=LONG_LEASE, **kwargs)


async def test_claims_up_to_the_limit_oldest_first_and_counts_an_attempt(storage: Any) -> None:
    ids = []
    for _ in range(3):
        ids.append(await create(storage, status=SagaStatus.RUNNING))
        await tick()
    before = {i: await storage.get_saga(i) for i in ids}
    claimed = await _claim(storage, "worker-a", limit=2)
    assert {s.saga_id for s in claimed} == set(ids[:2])  # the two oldest (in any order)
    for state in claimed:
        assert state.lease_owner == "worker-a"
        assert state.recovery_attempts == before[state.saga_id].recovery_attempts + 1
        assert state.version == before[state.saga_id].version + 1
        assert state == await storage.get_saga(state.saga_id)
    assert await storage.get_sagas_for_recovery(10) == [ids[2]]


async def test_pending_becomes_running_and_finished_or_parked_are_never_claimed(
    storage: Any,
) -> None:
    pending = await create(storage)
    for status in (SagaStatus.COMPLETED, SagaStatus.FAILED, SagaStatus.PARKED):
        await create(storage, status=status)
    claimed = await _claim(storage, "w")
    assert [(s.saga_id, s.status) for s in claimed] == [(pending, SagaStatus.RUNNING)]


async def test_leased_sagas_are_skipped_until_their_lease_expires(storage: Any) -> None:
    saga_id = await create(storage, status=SagaStatus.RUNNING)
    first = await storage.claim_due("w1", limit=5, lease_seconds=SHORT_LEASE)
    assert [s.saga_id for s in first] == [saga_id]
    assert await _claim(storage, "w2") == []
    await wait_for_expiry()
    assert [s.lease_owner for s in await _claim(storage, "w2")] == ["w2"]


async def test_names_attempts_and_staleness_filter_the_claim(storage: Any) -> None:
    wanted = await create(storage, status=SagaStatus.RUNNING)
    await create(storage, name="other", status=SagaStatus.RUNNING)
    exhausted = await create(storage, status=SagaStatus.RUNNING)
    await storage.set_recovery_attempts(exhausted, 3)
    assert await _claim(storage, "w", saga_names=frozenset({NAME}), max_recovery_attempts=2,
                        stale_after_seconds=60) == []
    claimed = await _claim(storage, "w", saga_names=frozenset({NAME}), max_recovery_attempts=2)
    assert [s.saga_id for s in claimed] == [wanted]


async def test_concurrent_workers_claim_disjoint_sagas(storage: Any) -> None:
    ids = {await create(storage, status=SagaStatus.RUNNING) for _ in range(12)}
    claimed: list[Any] = []
    for _ in range(12):  # rounds of four workers claiming at once, until all are claimed
        batches = await asyncio.gather(*(_claim(storage, f"w{n}", limit=5) for n in range(4)))
        claimed += [s.saga_id for batch in batches for s in batch]
        if set(claimed) >= ids:
            break
    # Rows another worker is claiming are skipped, never waited for nor taken twice (a
    # database may lock more rows than it returns, so a round can claim fewer than it could).
    assert len(claimed) == len(set(claimed))
    assert set(claimed) == ids


async def test_a_run_adopting_a_claimed_saga_writes_fenced_by_that_lease(storage: Any) -> None:
    saga_id = await create(storage, status=SagaStatus.RUNNING)
    (state,) = await storage.claim_due("worker-a", limit=1, lease_seconds=SHORT_LEASE)
    async with storage.create_run() as run:
        run.adopt(state, SHORT_LEASE)
        await run.log_step(saga_id, "Step", SagaAction.ACT, SagaStepStatus.COMPLETED)
        await run.commit()
        assert (await storage.get_saga(saga_id)).version == state.version + 1
    await wait_for_expiry()
    (taken,) = await _claim(storage, "worker-b")
    assert taken.saga_id == saga_id
    async with storage.create_run() as stale:
        stale.adopt(state, SHORT_LEASE)  # the old claim: fenced out
        await stale.log_step(saga_id, "Late", SagaAction.ACT, SagaStepStatus.COMPLETED)
        with pytest.raises(SagaConcurrencyError):  # SagaLeaseLostError is one
            await stale.commit()
    assert [e.step_name for e in await storage.get_step_history(saga_id)] == ["Step"]


async def test_a_stale_run_neither_renews_nor_releases_a_later_claim_by_the_same_owner(
    storage: Any,
) -> None:
    """A worker whose run stalled past its lease claims the saga again under the same owner id
    while that run is still in hand: the stale run's renewal and release must not touch the new
    lease (they are fenced by version too)."""
    saga_id = await create(storage, status=SagaStatus.RUNNING)
    [first] = await storage.claim_due("w", limit=1, lease_seconds=SHORT_LEASE)
    async with storage.create_run() as stale:
        stale.adopt(first, SHORT_LEASE)
        await wait_for_expiry()
        [again] = await _claim(storage, "w")
        assert again.version > first.version
        with pytest.raises(SagaLeaseLostError):
            await stale.renew_lease(LONG_LEASE)
        await stale.release()
    state = await storage.get_saga(saga_id)
    assert (state.lease_owner, state.version) == ("w", again.version)
    assert state.lease_expires_at is not None
