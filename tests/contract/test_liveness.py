"""Liveness sessions: a lease whose owner's session is gone is free at once, on every backend.

A worker claims under its session's live owner id. While the session is open, its leases hold as
any lease does; once it is closed (the worker died, or stopped), every claim treats them as run
out, whatever their expiry says (see sagakit.storage.liveness). All leases here are long: only
liveness can free them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sagakit.exceptions import SagaBusyError
from sagakit.queue import QueueSettings
from sagakit.records import SagaStatus
from sagakit.storage.liveness import LIVE_MARK
from tests.contract.support import LONG_LEASE, create
from tests.contract.test_queues import Q, submit


async def _claim_due(storage: Any, owner: str) -> list[Any]:
    return await storage.claim_due(owner, limit=10, lease_seconds=LONG_LEASE)


async def _claim_queued(storage: Any, owner: str) -> list[Any]:
    return await storage.claim_queued(owner, Q, limit=10, lease_seconds=LONG_LEASE)


async def test_a_session_gives_a_live_owner_id_each_time_a_new_one(storage: Any) -> None:
    async with storage.liveness() as one, storage.liveness() as two:
        assert one.live
        assert two.live
        assert one.owner.startswith(LIVE_MARK)
        assert two.owner.startswith(LIVE_MARK)
        assert one.owner != two.owner
    assert not one.live


async def test_an_open_sessions_leases_hold_and_a_closed_ones_are_free_at_once(
    storage: Any,
) -> None:
    saga_id = await create(storage, status=SagaStatus.RUNNING)
    async with storage.liveness() as live:
        [mine] = await _claim_due(storage, live.owner)
        assert mine.lease_owner == live.owner
        assert await _claim_due(storage, "other") == []  # alive: its lease holds
        assert await storage.get_sagas_for_recovery(10) == []
    # The worker is gone: its saga is taken over now, its lease far from run out.
    [taken] = await _claim_due(storage, "other")
    assert (taken.saga_id, taken.lease_owner, taken.recovery_attempts) == (saga_id, "other", 2)


async def test_a_plain_owners_lease_is_never_judged_by_liveness(storage: Any) -> None:
    await create(storage, status=SagaStatus.RUNNING)
    assert len(await _claim_due(storage, "plain-worker")) == 1
    async with storage.liveness():
        pass
    assert await _claim_due(storage, "other") == []


@pytest.mark.parametrize("alive", [True, False])
async def test_claiming_one_saga_by_id(storage: Any, alive: bool) -> None:
    saga_id = await create(storage, status=SagaStatus.RUNNING)
    async with storage.liveness() as live:
        await _claim_due(storage, live.owner)
        if alive:
            async with storage.create_run() as run:
                with pytest.raises(SagaBusyError):
                    await run.claim(saga_id, lease_seconds=LONG_LEASE)
            return
    async with storage.create_run() as run:
        state = await run.claim(saga_id, lease_seconds=LONG_LEASE)
        assert state.lease_owner == run.owner


async def test_a_dead_workers_queued_sagas_are_taken_over_and_free_their_slots(
    storage: Any,
) -> None:
    await storage.set_queue(QueueSettings(Q, concurrency=1))
    first = await submit(storage)
    second = await submit(storage)
    async with storage.liveness() as live:
        [state] = await _claim_queued(storage, live.owner)
        assert state.saga_id == first
        assert await _claim_queued(storage, "other") == []  # the one slot is taken
    [again] = await _claim_queued(storage, "other")
    assert (again.saga_id, again.lease_owner, again.recovery_attempts) == (first, "other", 1)
    assert (await storage.get_saga(second)).status is SagaStatus.PENDING


async def test_a_dead_owners_saga_no_longer_counts_against_the_queue_limit(
    storage: Any,
) -> None:
    await storage.set_queue(QueueSettings(Q, concurrency=1))
    first = await submit(storage)
    async with storage.liveness() as live:
        await _claim_queued(storage, live.owner)
    second = await submit(storage)
    # The dead worker's saga is due again (older, so first); its slot counts as free.
    claimed = await storage.claim_queued("other", Q, limit=1, lease_seconds=LONG_LEASE)
    assert [s.saga_id for s in claimed] == [first]
    assert (await storage.get_saga(second)).status is SagaStatus.PENDING


async def test_a_session_looks_for_orphans_and_wakes_its_worker(storage: Any) -> None:
    """The look every worker's session takes: a saga in flight under a dead live owner (not
    its own, not a plain owner's, not one whose lease ran out) wakes it."""
    woken = asyncio.Event()
    await create(storage, status=SagaStatus.RUNNING)
    async with storage.liveness() as watcher:
        watcher.every = 0.02
        watcher.on_orphans = woken.set
        await storage.claim_due("plain-owner", limit=10, lease_seconds=LONG_LEASE)
        await create(storage, status=SagaStatus.RUNNING)
        await _claim_due(storage, watcher.owner)  # its own: never an orphan to itself
        async with storage.liveness() as doomed:
            await create(storage, status=SagaStatus.RUNNING)
            await _claim_due(storage, doomed.owner)
            await asyncio.sleep(0.2)
            assert not woken.is_set()  # every owner alive, or plain
        await asyncio.wait_for(woken.wait(), 10)
