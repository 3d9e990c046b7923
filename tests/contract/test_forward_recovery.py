"""Contract: what forward recovery keeps in a storage. Attempt numbers of log entries, waits
before a step's next attempt (durable ones release the lease and make the saga WAITING), the
pivot mark and a saga's deadline; each one buffered, written by ``commit()`` and fenced like any
checkpoint."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

from sagakit.exceptions import SagaLeaseLostError
from sagakit.records import SagaAction, SagaStatus, SagaStepStatus
from tests.contract.support import (
    LONG_LEASE,
    NAME,
    SHORT_LEASE,
    assert_writes_nothing,
    create,
    new_id,
    snapshot,
    wait_for_expiry,
)

FAR = 60.0  # a wait that cannot pass during a test
NEAR = SHORT_LEASE  # a wait that has passed after wait_for_expiry()
SAME_STATEMENT = timedelta(milliseconds=5)  # one write's timestamps, as the database rounds them


async def start(run: Any, saga_id: UUID | None = None, *, lease_seconds: float = LONG_LEASE,
                **options: Any) -> UUID:
    saga_id = saga_id or new_id()
    await run.start(saga_id, NAME, {"n": 0}, fingerprint=None, lease_seconds=lease_seconds,
                    **options)
    return saga_id


async def fail_attempt(run: Any, saga_id: UUID, attempt: int, seconds: float, *,
                       release: bool) -> None:
    """Commit a failed attempt that will be retried: its RETRYING entry and the wait."""
    await run.log_step(saga_id, "Ship", SagaAction.ACT, SagaStepStatus.RETRYING,
                       "TimeoutError: carrier slow", error_type="builtins.TimeoutError",
                       attempt=attempt)
    await run.wait(saga_id, seconds, release=release)
    await run.commit()


def about(delta: timedelta, seconds: float) -> bool:
    """Two timestamps of one write are ``seconds`` apart (compared as the row stores them)."""
    return abs(delta - timedelta(seconds=seconds)) < SAME_STATEMENT


async def due(storage: Any) -> list[UUID]:
    return list(await storage.get_sagas_for_recovery(100))


# -- attempt numbers ----------------------------------------------------------------------------


async def test_log_entries_keep_their_attempt_numbers(storage: Any) -> None:
    async with storage.create_run() as run:
        saga_id = await start(run)
        await run.log_step(saga_id, "Ship", SagaAction.ACT, SagaStepStatus.RETRYING,
                           "ConnectionError: reset", error_type="builtins.ConnectionError",
                           attempt=1)
        await run.commit()
        await run.log_step(saga_id, "Ship", SagaAction.ACT, SagaStepStatus.RETRYING,
                           "TimeoutError", error_type="builtins.TimeoutError", attempt=2)
        await run.log_step(saga_id, "Ship", SagaAction.ACT, SagaStepStatus.COMPLETED, attempt=3)
        await run.log_step(saga_id, "Notify", SagaAction.ACT, SagaStepStatus.COMPLETED)
        await run.commit()
    await storage.log_step(saga_id, "Notify", "compensate", SagaStepStatus.COMPENSATED)
    history = await storage.get_step_history(saga_id)
    assert [(e.step_name, e.status, e.attempt, e.error_type, e.details) for e in history] == [
        ("Ship", SagaStepStatus.RETRYING, 1, "builtins.ConnectionError", "ConnectionError: reset"),
        ("Ship", SagaStepStatus.RETRYING, 2, "builtins.TimeoutError", "TimeoutError"),
        ("Ship", SagaStepStatus.COMPLETED, 3, None, None),
        ("Notify", SagaStepStatus.COMPLETED, None, None, None),
        ("Notify", SagaStepStatus.COMPENSATED, None, None, None),
    ]


async def test_the_commit_per_call_log_step_takes_an_attempt_too(storage: Any) -> None:
    saga_id = await create(storage)
    await storage.log_step(saga_id, "Ship", "act", SagaStepStatus.FAILED, "gave up",
                           error_type="x.E", attempt=4)
    [entry] = await storage.get_step_history(saga_id)
    assert (entry.status, entry.attempt, entry.details) == (SagaStepStatus.FAILED, 4, "gave up")


@pytest.mark.parametrize("attempt", [0, -1, 1.5, True, 2**31])
async def test_a_bad_attempt_number_is_refused_before_anything_is_buffered(
    storage: Any, attempt: Any
) -> None:
    saga_id = await create(storage)
    async with storage.create_run() as run:
        with pytest.raises(ValueError, match="attempt"):
            await run.log_step(saga_id, "Ship", "act", SagaStepStatus.RETRYING, attempt=attempt)
        assert not run.has_pending


# -- durable waits --------------------------------------------------------------------------------


async def test_a_durable_wait_makes_the_saga_waiting_and_frees_its_lease(storage: Any) -> None:
    async with storage.create_run() as run:
        saga_id = await start(run)
        await storage.set_recovery_attempts(saga_id, 2)
        await run.claim(saga_id, lease_seconds=LONG_LEASE, count_attempt=False)
        before = await storage.get_saga(saga_id)
        await fail_attempt(run, saga_id, 1, FAR, release=True)
        assert not run.holds_lease
        state, history = await snapshot(storage, saga_id)
    assert state.status is SagaStatus.WAITING
    assert (state.lease_owner, state.lease_expires_at) == (None, None)
    assert (state.version, state.recovery_attempts) == (before.version + 1, 2)
    assert state.next_attempt_at is not None
    assert state.updated_at is not None
    assert about(state.next_attempt_at - state.updated_at, FAR)
    assert [(e.status, e.attempt) for e in history] == [(SagaStepStatus.RETRYING, 1)]


async def test_a_waiting_saga_is_neither_listed_nor_claimed_before_it_is_due(
    storage: Any,
) -> None:
    async with storage.create_run() as run:
        saga_id = await start(run)
        await fail_attempt(run, saga_id, 1, FAR, release=True)
    before = await snapshot(storage, saga_id)
    assert await due(storage) == []
    assert await storage.claim_due("worker", limit=10, lease_seconds=LONG_LEASE) == []
    assert await snapshot(storage, saga_id) == before
    assert [s.saga_id for s in await storage.list_sagas(
        statuses=frozenset({SagaStatus.WAITING}))] == [saga_id]


@pytest.mark.parametrize("how", ["claim_due", "claim"])
async def test_a_due_waiting_saga_is_listed_and_claimed_without_counting_an_attempt(
    storage: Any, how: str
) -> None:
    async with storage.create_run() as run:
        saga_id = await start(run)
        await storage.set_recovery_attempts(saga_id, 3)
        await run.claim(saga_id, lease_seconds=LONG_LEASE, count_attempt=False)
        await fail_attempt(run, saga_id, 1, NEAR, release=True)
    waiting = await storage.get_saga(saga_id)
    await wait_for_expiry()
    assert await due(storage) == [saga_id]
    if how == "claim_due":
        [state] = await storage.claim_due("worker", limit=10, lease_seconds=LONG_LEASE)
        assert state.lease_owner == "worker"
    else:
        async with storage.create_run() as other:
            state = await other.claim(saga_id, lease_seconds=LONG_LEASE)  # count_attempt=True
            assert state.lease_owner == other.owner
            assert other.holds_lease
            await other.release()
    assert state.saga_id == saga_id
    assert state.status is SagaStatus.RUNNING
    assert state.recovery_attempts == 3  # a wait is not an interruption
    assert state.version == waiting.version + 1
    stored = await storage.get_saga(saga_id)
    assert (stored.status, stored.recovery_attempts) == (SagaStatus.RUNNING, 3)


async def test_waiting_and_crashed_sagas_are_claimed_together_each_counted_as_it_should(
    storage: Any,
) -> None:
    async with storage.create_run() as run:
        waited = await start(run)
        await fail_attempt(run, waited, 1, NEAR, release=True)
    crashed = await create(storage, status=SagaStatus.RUNNING)
    pending = await create(storage)
    await wait_for_expiry()
    claimed = {s.saga_id: s for s in await storage.claim_due("w", limit=10,
                                                            lease_seconds=LONG_LEASE)}
    assert {i: (s.status, s.recovery_attempts) for i, s in claimed.items()} == {
        waited: (SagaStatus.RUNNING, 0),
        crashed: (SagaStatus.RUNNING, 1),
        pending: (SagaStatus.RUNNING, 1),
    }


async def test_an_explicit_claim_takes_a_waiting_saga_before_it_is_due(storage: Any) -> None:
    async with storage.create_run() as run:
        saga_id = await start(run)
        await fail_attempt(run, saga_id, 1, FAR, release=True)
    async with storage.create_run() as other:
        state = await other.claim(saga_id, lease_seconds=LONG_LEASE)
    assert (state.status, state.recovery_attempts) == (SagaStatus.RUNNING, 0)


# -- waits in the process -------------------------------------------------------------------------


async def test_a_wait_in_the_process_keeps_the_lease_and_the_status(storage: Any) -> None:
    async with storage.create_run() as run:
        saga_id = await start(run)
        await fail_attempt(run, saga_id, 1, FAR, release=False)
        assert run.holds_lease
        state = await storage.get_saga(saga_id)
        assert (state.status, state.lease_owner) == (SagaStatus.RUNNING, run.owner)
        assert state.next_attempt_at is not None
        assert state.updated_at is not None
        assert about(state.next_attempt_at - state.updated_at, FAR)
        # The run goes on under its lease after the wait: its next checkpoint is fenced by it.
        await run.log_step(saga_id, "Ship", SagaAction.ACT, SagaStepStatus.COMPLETED, attempt=2)
        await run.commit()
        assert (await storage.get_saga(saga_id)).lease_owner == run.owner


async def test_a_crash_during_a_wait_in_the_process_resumes_no_earlier_than_the_wait(
    storage: Any,
) -> None:
    async with storage.create_run() as far_run, storage.create_run() as near_run:
        far = await start(far_run, lease_seconds=SHORT_LEASE)
        near = await start(near_run, lease_seconds=SHORT_LEASE)
        await fail_attempt(far_run, far, 1, FAR, release=False)
        await fail_attempt(near_run, near, 1, NEAR, release=False)
        await wait_for_expiry()  # both leases ran out: their processes "died"
        assert await due(storage) == [near]
        [state] = await storage.claim_due("w", limit=10, lease_seconds=LONG_LEASE)
        assert (await storage.get_saga(far)).lease_owner == far_run.owner  # expired, unclaimed
    assert state.saga_id == near
    assert (state.status, state.recovery_attempts) == (SagaStatus.RUNNING, 1)  # a crash counts


async def test_clear_wait_makes_the_saga_due_as_any_other(storage: Any) -> None:
    async with storage.create_run() as run:
        saga_id = await start(run, lease_seconds=SHORT_LEASE)
        await fail_attempt(run, saga_id, 1, FAR, release=False)
        await run.log_step(saga_id, "Ship", SagaAction.ACT, SagaStepStatus.COMPLETED, attempt=2)
        await run.clear_wait(saga_id)
        await run.commit()
        state = await storage.get_saga(saga_id)
        assert (state.next_attempt_at, state.lease_owner) == (None, run.owner)
        await wait_for_expiry()
        assert await due(storage) == [saga_id]


async def test_the_later_of_wait_and_clear_wait_wins_within_a_checkpoint(storage: Any) -> None:
    async with storage.create_run() as run:
        first = await start(run)
        await run.wait(first, FAR, release=False)
        await run.clear_wait(first)
        await run.commit()
    async with storage.create_run() as run:
        second = await start(run)
        await run.clear_wait(second)
        await run.wait(second, FAR, release=False)
        await run.commit()
    assert (await storage.get_saga(first)).next_attempt_at is None
    assert (await storage.get_saga(second)).next_attempt_at is not None


@pytest.mark.parametrize("seconds", [-1.0, float("nan"), float("inf"), "5"])
async def test_a_bad_wait_is_refused_before_anything_is_buffered(
    storage: Any, seconds: Any
) -> None:
    saga_id = await create(storage)
    async with storage.create_run() as run:
        with pytest.raises(ValueError, match="seconds"):
            await run.wait(saga_id, seconds, release=True)
        assert not run.has_pending


# -- the pivot ------------------------------------------------------------------------------------


async def test_the_pivot_mark_is_read_back_and_kept_by_later_checkpoints(storage: Any) -> None:
    async with storage.create_run() as run:
        saga_id = await start(run)
        assert (await storage.get_saga(saga_id)).past_pivot is False
        await run.log_step(saga_id, "Charge", SagaAction.ACT, SagaStepStatus.COMPLETED)
        await run.update_context(saga_id, {"n": 1})
        await run.pivot(saga_id)
        await run.commit()
        assert (await storage.get_saga(saga_id)).past_pivot is True
        await fail_attempt(run, saga_id, 1, NEAR, release=True)
    await wait_for_expiry()
    [claimed] = await storage.claim_due("w", limit=10, lease_seconds=LONG_LEASE)
    assert claimed.past_pivot is True
    async with storage.create_run() as run:
        run.adopt(claimed, LONG_LEASE)
        await run.log_step(saga_id, "Ship", SagaAction.ACT, SagaStepStatus.COMPLETED, attempt=2)
        await run.update_status(saga_id, SagaStatus.COMPLETED)
        await run.clear_wait(saga_id)
        await run.commit()
    state = await storage.get_saga(saga_id)
    assert (state.status, state.past_pivot, state.next_attempt_at) == (
        SagaStatus.COMPLETED, True, None)
    assert [s.past_pivot for s in await storage.list_sagas()] == [True]


# -- the deadline ---------------------------------------------------------------------------------


async def test_a_start_with_a_deadline_stores_when_it_passes(storage: Any) -> None:
    async with storage.create_run() as run:
        with_deadline = await start(run, deadline_seconds=90.5)
    async with storage.create_run() as run:
        without = await start(run)
    state = await storage.get_saga(with_deadline)
    assert state.deadline_at is not None
    assert state.created_at is not None
    assert about(state.deadline_at - state.created_at, 90.5)
    assert (await storage.get_saga(without)).deadline_at is None


async def test_a_start_that_claims_keeps_the_stored_deadline(storage: Any) -> None:
    async with storage.create_run() as run:
        saga_id = await start(run, lease_seconds=SHORT_LEASE, deadline_seconds=30)
    stored: datetime | None = (await storage.get_saga(saga_id)).deadline_at
    await wait_for_expiry()
    async with storage.create_run() as run:
        state, created = await run.start(saga_id, NAME, {}, fingerprint=None,
                                         lease_seconds=LONG_LEASE, deadline_seconds=999)
        assert created is False
        assert state.deadline_at == stored
    assert (await storage.get_saga(saga_id)).deadline_at == stored


async def test_a_bad_deadline_is_refused_before_anything_is_written(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as run:
        with pytest.raises(ValueError, match="deadline_seconds"):
            await start(run, saga_id, deadline_seconds=-1)
    assert await storage.list_sagas() == []


# -- fencing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("release", [True, False])
async def test_a_taken_over_run_writes_no_wait_attempt_or_pivot(
    storage: Any, release: bool
) -> None:
    async with storage.create_run() as loser, storage.create_run() as winner:
        saga_id = await start(loser, lease_seconds=SHORT_LEASE)
        await wait_for_expiry()
        await winner.claim(saga_id, lease_seconds=LONG_LEASE)
        await loser.log_step(saga_id, "Ship", SagaAction.ACT, SagaStepStatus.RETRYING,
                             "late", attempt=2)
        await loser.wait(saga_id, NEAR, release=release)
        await loser.pivot(saga_id)
        await assert_writes_nothing(storage, saga_id, SagaLeaseLostError, loser.commit)
        state = await storage.get_saga(saga_id)
        assert (state.status, state.lease_owner, state.next_attempt_at, state.past_pivot) == (
            SagaStatus.RUNNING, winner.owner, None, False)
        await loser.clear_wait(saga_id)
        await assert_writes_nothing(storage, saga_id, SagaLeaseLostError, loser.commit)
