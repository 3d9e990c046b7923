"""Contract: a leased run's fencing token is the saga's version when the run took its lease;
its own checkpoints do not change it, and every takeover (``claim``, ``claim_due`` + ``adopt``,
``start`` of an existing id) gives a larger one."""

from __future__ import annotations

from typing import Any

from sagakit.records import SagaStatus
from tests.contract.support import (
    LONG_LEASE,
    NAME,
    SHORT_LEASE,
    commit_checkpoint,
    new_id,
    wait_for_expiry,
)


async def test_tokens_grow_at_every_takeover_and_never_within_a_run(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as first, storage.create_run() as second, \
            storage.create_run() as third, storage.create_run() as fourth:
        state, created = await first.start(saga_id, NAME, {"n": 0}, fingerprint=None,
                                           lease_seconds=SHORT_LEASE)
        assert created
        assert first.fencing_token == state.version == 1
        await commit_checkpoint(first, saga_id, context={"n": 1})
        await commit_checkpoint(first, saga_id, context={"n": 2})
        assert first.fencing_token == 1  # its checkpoints moved the version, not the token

        await wait_for_expiry()
        claimed = await second.claim(saga_id, lease_seconds=SHORT_LEASE)
        assert second.fencing_token == claimed.version == 4  # 1 start + 2 checkpoints + claim
        await commit_checkpoint(second, saga_id, context={"n": 3})

        await wait_for_expiry()
        [due] = await storage.claim_due("a-worker", limit=1, lease_seconds=SHORT_LEASE)
        third.adopt(due, SHORT_LEASE)
        assert third.fencing_token == due.version == 6

        await wait_for_expiry()
        restarted, created = await fourth.start(saga_id, NAME, {"n": 0}, fingerprint=None,
                                                lease_seconds=LONG_LEASE)
        assert not created
        assert fourth.fencing_token == restarted.version == 7
        assert [r.fencing_token for r in (first, second, third, fourth)] == [1, 4, 6, 7]
        assert (await storage.get_saga(saga_id)).lease_owner == fourth.owner


async def test_a_terminal_saga_gives_its_stored_version_and_no_lease(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as run:
        await run.start(saga_id, NAME, {"n": 0}, fingerprint=None, lease_seconds=LONG_LEASE)
        await commit_checkpoint(run, saga_id, status=SagaStatus.COMPLETED)
    async with storage.create_run() as late:
        state = await late.claim(saga_id, lease_seconds=LONG_LEASE)
        assert state.status is SagaStatus.COMPLETED
        assert late.fencing_token == state.version == 2  # nothing written, nothing to fence
