"""Contract: a leased run's commits are fenced by owner and version; renew, release, and what
leaving a run does with its lease."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest

from sagakit.exceptions import SagaBusyError, SagaConcurrencyError, SagaLeaseLostError
from sagakit.records import SagaStatus, SagaStepStatus
from tests.contract.support import (
    LONG_LEASE,
    NAME,
    SHORT_LEASE,
    assert_writes_nothing,
    buffer_checkpoint,
    commit_checkpoint,
    create,
    new_id,
    snapshot,
    wait_for_expiry,
)

RELEASING = [
    pytest.param(SagaStatus.COMPLETED, id="completed"),
    pytest.param(SagaStatus.FAILED, id="failed"),
    pytest.param(SagaStatus.PARKED, id="parked"),
]


async def start(run: Any, saga_id: UUID, lease_seconds: float = LONG_LEASE) -> None:
    await run.start(saga_id, NAME, {"n": 0}, fingerprint=None, lease_seconds=lease_seconds)


async def take_over(loser: Any, winner: Any, saga_id: UUID) -> None:
    """``loser`` starts the saga with a short lease that runs out; ``winner`` claims it."""
    await start(loser, saga_id, SHORT_LEASE)
    await wait_for_expiry()
    await winner.claim(saga_id, lease_seconds=LONG_LEASE)


async def assert_busy(storage: Any, saga_id: UUID) -> None:
    async with storage.create_run() as other:
        await assert_writes_nothing(
            storage, saga_id, SagaBusyError,
            lambda: other.claim(saga_id, lease_seconds=LONG_LEASE),
        )


async def test_a_leased_run_commits_and_keeps_its_lease(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as run:
        await start(run, saga_id)
        await commit_checkpoint(run, saga_id, context={"n": 1})
        await commit_checkpoint(run, saga_id, status=SagaStatus.COMPENSATING)

        state = await storage.get_saga(saga_id)
        assert (state.status, state.context, state.version) == (
            SagaStatus.COMPENSATING, {"n": 1}, 3,
        )
        assert state.lease_owner == run.owner
        assert run.version == 3
        await assert_busy(storage, saga_id)


async def test_a_taken_over_run_writes_nothing(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as loser, storage.create_run() as winner:
        await take_over(loser, winner, saga_id)
        await buffer_checkpoint(
            loser, saga_id, steps=("reserve", "charge"), context={"n": "stale"},
            status=SagaStatus.COMPLETED,
        )

        await assert_writes_nothing(storage, saga_id, SagaLeaseLostError, loser.commit)

        state, history = await snapshot(storage, saga_id)
        assert (state.status, state.context, state.lease_owner) == (
            SagaStatus.RUNNING, {"n": 0}, winner.owner,
        )
        assert history == []
        await commit_checkpoint(winner, saga_id, context={"n": "winner"})
        assert (await storage.get_saga(saga_id)).context == {"n": "winner"}


async def test_lease_lost_is_a_concurrency_error(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as loser, storage.create_run() as winner:
        await take_over(loser, winner, saga_id)
        await loser.log_step(saga_id, "reserve", "act", SagaStepStatus.COMPLETED)
        with pytest.raises(SagaConcurrencyError):
            await loser.commit()


async def test_a_taken_over_run_keeps_failing(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as loser, storage.create_run() as winner:
        await take_over(loser, winner, saga_id)
        for _ in range(2):
            await buffer_checkpoint(loser, saga_id, context={"n": "stale"})
            await assert_writes_nothing(storage, saga_id, SagaLeaseLostError, loser.commit)


async def test_a_run_that_saw_its_lease_lost_on_renew_still_writes_nothing(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as loser, storage.create_run() as winner:
        await take_over(loser, winner, saga_id)
        with pytest.raises(SagaLeaseLostError):
            await loser.renew_lease(LONG_LEASE)

        await buffer_checkpoint(loser, saga_id, context={"n": "stale"})
        await assert_writes_nothing(storage, saga_id, SagaLeaseLostError, loser.commit)
        assert (await storage.get_saga(saga_id)).lease_owner == winner.owner


async def test_a_commit_by_someone_else_fences_the_leased_run(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as run:
        await start(run, saga_id)
        await storage.update_context(saga_id, {"n": "outside"})
        await buffer_checkpoint(run, saga_id, context={"n": "run"})

        await assert_writes_nothing(storage, saga_id, SagaConcurrencyError, run.commit)


async def test_an_expired_lease_not_taken_over_still_lets_its_owner_commit(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as run:
        await start(run, saga_id, SHORT_LEASE)
        await wait_for_expiry()
        await commit_checkpoint(run, saga_id, context={"n": 1})

        state = await storage.get_saga(saga_id)
        assert (state.context, state.version, state.lease_owner) == ({"n": 1}, 2, run.owner)


async def test_renew_lease_keeps_others_out(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as run:
        await start(run, saga_id, SHORT_LEASE)
        await run.renew_lease(LONG_LEASE)
        await wait_for_expiry()  # the original short lease is long gone

        await assert_busy(storage, saga_id)
        assert (await storage.get_saga(saga_id)).lease_owner == run.owner
        await commit_checkpoint(run, saga_id, context={"n": 1})  # renewing did not fence it out
        assert (await storage.get_saga(saga_id)).context == {"n": 1}


async def test_renew_lease_after_a_takeover_raises(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as loser, storage.create_run() as winner:
        await take_over(loser, winner, saga_id)
        await assert_writes_nothing(
            storage, saga_id, SagaLeaseLostError, lambda: loser.renew_lease(LONG_LEASE)
        )
        assert (await storage.get_saga(saga_id)).lease_owner == winner.owner


async def test_release_frees_the_saga_as_last_committed(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as run, storage.create_run() as other:
        await start(run, saga_id)
        await commit_checkpoint(run, saga_id, context={"n": 1}, status=SagaStatus.COMPENSATING)
        await buffer_checkpoint(run, saga_id, context={"n": "never committed"})
        await run.rollback()
        await run.release()

        state, history = await snapshot(storage, saga_id)
        assert state.lease_owner is None
        assert (state.status, state.context) == (SagaStatus.COMPENSATING, {"n": 1})
        assert [e.step_name for e in history] == ["reserve"]

        claimed = await other.claim(saga_id, lease_seconds=LONG_LEASE)
        assert claimed.lease_owner == other.owner


async def test_release_after_a_takeover_leaves_the_new_owner_alone(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as loser, storage.create_run() as winner:
        await take_over(loser, winner, saga_id)
        await loser.release()
        assert (await storage.get_saga(saga_id)).lease_owner == winner.owner
        await assert_busy(storage, saga_id)


@pytest.mark.parametrize("status", RELEASING)
async def test_a_commit_to_a_final_status_releases_the_lease(
    storage: Any, status: SagaStatus
) -> None:
    saga_id = new_id()
    async with storage.create_run() as run:
        await start(run, saga_id)
        await commit_checkpoint(run, saga_id, context={"n": 1}, status=status)

        state = await storage.get_saga(saga_id)
        assert (state.status, state.context, state.version) == (status, {"n": 1}, 2)
        assert state.lease_owner is None
        assert saga_id not in await storage.get_sagas_for_recovery(limit=10)
    if status is SagaStatus.PARKED:
        async with storage.create_run() as other:
            claimed = await other.claim(saga_id, lease_seconds=LONG_LEASE, allow_parked=True)
            assert claimed.lease_owner == other.owner


@pytest.mark.parametrize("status", [SagaStatus.RUNNING, SagaStatus.COMPENSATING])
async def test_a_commit_to_a_live_status_keeps_the_lease(
    storage: Any, status: SagaStatus
) -> None:
    saga_id = new_id()
    async with storage.create_run() as run:
        await start(run, saga_id)
        await commit_checkpoint(run, saga_id, status=status)
        assert (await storage.get_saga(saga_id)).lease_owner == run.owner
        await assert_busy(storage, saga_id)


async def test_reset_recovery_attempts_in_a_leased_checkpoint(storage: Any) -> None:
    saga_id = await create(storage, status=SagaStatus.RUNNING)
    await storage.set_recovery_attempts(saga_id, 4)
    async with storage.create_run() as run:
        state = await run.claim(saga_id, lease_seconds=LONG_LEASE)
        assert state.recovery_attempts == 5
        await run.reset_recovery_attempts(saga_id)
        assert (await storage.get_saga(saga_id)).recovery_attempts == 5  # buffered only
        await commit_checkpoint(run, saga_id, context={"n": 1})

        state = await storage.get_saga(saga_id)
        assert (state.recovery_attempts, state.context) == (0, {"n": 1})
        assert state.lease_owner == run.owner


@pytest.mark.parametrize("raises", [False, True])
async def test_leaving_a_run_releases_its_lease(storage: Any, raises: bool) -> None:
    saga_id = new_id()

    async def leave_holding_the_lease() -> None:
        async with storage.create_run() as run:
            await start(run, saga_id)
            await commit_checkpoint(run, saga_id, context={"n": 1})
            await buffer_checkpoint(run, saga_id, context={"n": "dropped"})
            if raises:
                raise RuntimeError("boom")

    if raises:
        with pytest.raises(RuntimeError, match="boom"):
            await leave_holding_the_lease()
    else:
        await leave_holding_the_lease()

    state = await storage.get_saga(saga_id)
    assert (state.lease_owner, state.context, state.status) == (None, {"n": 1}, SagaStatus.RUNNING)
    async with storage.create_run() as other:
        claimed = await other.claim(saga_id, lease_seconds=LONG_LEASE)
        assert claimed.lease_owner == other.owner


async def test_leaving_a_taken_over_run_leaves_the_new_owner_alone(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as winner:
        async with storage.create_run() as loser:
            await take_over(loser, winner, saga_id)
        assert (await storage.get_saga(saga_id)).lease_owner == winner.owner
