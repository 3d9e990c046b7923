"""Contract: a run buffers the seed's operations and writes them as one checkpoint at commit().

The runs here never start or claim, so their commits are not lease-fenced; see test_fencing.py
for leased runs.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest

from sagakit.exceptions import SagaConcurrencyError, SagaError, SagaNotFoundError
from sagakit.records import SagaAction, SagaStatus, SagaStepStatus
from tests.contract.support import (
    NAME,
    Snapshot,
    assert_writes_nothing,
    buffer_checkpoint,
    commit_checkpoint,
    create,
    new_id,
    snapshot,
)


async def assert_unchanged_through_run(
    storage: Any, run: Any, saga_id: UUID, before: Snapshot
) -> None:
    """Nothing buffered is visible: not through the storage and not through the run itself."""
    state, history = before
    assert await snapshot(storage, saga_id) == before
    assert await storage.load_saga_state(saga_id) == (state.status, state.context, state.version)
    assert await run.load_saga_state(saga_id) == (state.status, state.context, state.version)
    assert await run.get_step_history(saga_id) == history


async def test_buffered_writes_are_invisible_until_commit(storage: Any) -> None:
    saga_id = await create(storage, {"n": 0})
    before = await snapshot(storage, saga_id)

    async with storage.create_run() as run:
        await buffer_checkpoint(
            run, saga_id, steps=("reserve", "charge"), context={"n": 2},
            status=SagaStatus.COMPENSATING,
        )
        await run.reset_recovery_attempts(saga_id)
        await assert_unchanged_through_run(storage, run, saga_id, before)

        await run.commit()

        state, history = await snapshot(storage, saga_id)
        assert (state.status, state.context, state.version) == (
            SagaStatus.COMPENSATING, {"n": 2}, 2,
        )
        assert [(e.step_name, e.action, e.status) for e in history] == [
            ("reserve", SagaAction.ACT, SagaStepStatus.COMPLETED),
            ("charge", SagaAction.ACT, SagaStepStatus.COMPLETED),
        ]
        assert await run.load_saga_state(saga_id) == (SagaStatus.COMPENSATING, {"n": 2}, 2)
        assert await run.get_step_history(saga_id) == history


async def test_a_buffered_create_is_invisible_until_commit(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as run:
        await run.create_saga(saga_id, NAME, {"n": 1})
        await run.log_step(saga_id, "reserve", "act", SagaStepStatus.STARTED)
        for read in (storage.get_saga, storage.load_saga_state, run.load_saga_state):
            with pytest.raises(SagaNotFoundError):
                await read(saga_id)
        assert await run.get_step_history(saga_id) == []

        await run.commit()

    state, history = await snapshot(storage, saga_id)
    assert (state.status, state.context, state.version) == (SagaStatus.PENDING, {"n": 1}, 1)
    assert [(e.step_name, e.status) for e in history] == [("reserve", SagaStepStatus.STARTED)]


async def test_create_with_status_in_one_checkpoint_is_version_1(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as run:
        await run.create_saga(saga_id, NAME, {"n": 1})
        await run.update_status(saga_id, SagaStatus.RUNNING)
        await run.commit()
    assert await storage.load_saga_state(saga_id) == (SagaStatus.RUNNING, {"n": 1}, 1)


async def test_a_buffered_create_of_an_existing_id_writes_nothing(storage: Any) -> None:
    saga_id = await create(storage, {"original": True})

    async def duplicate() -> None:
        async with storage.create_run() as run:
            await run.create_saga(saga_id, "other", {"original": False})
            await run.log_step(saga_id, "reserve", "act", SagaStepStatus.COMPLETED)
            await run.commit()

    await assert_writes_nothing(storage, saga_id, SagaConcurrencyError, duplicate)


async def test_rollback_drops_the_buffered_writes(storage: Any) -> None:
    saga_id = await create(storage)
    before = await snapshot(storage, saga_id)

    async with storage.create_run() as run:
        await buffer_checkpoint(run, saga_id, context={"n": 5}, status=SagaStatus.RUNNING)
        await run.rollback()
        await run.commit()  # nothing left to write
        await assert_unchanged_through_run(storage, run, saga_id, before)

        await commit_checkpoint(run, saga_id, steps=("after",), context={"n": 6})

    state, history = await snapshot(storage, saga_id)
    assert (state.status, state.context, state.version) == (SagaStatus.PENDING, {"n": 6}, 2)
    assert [e.step_name for e in history] == ["after"]


async def test_commit_with_nothing_buffered_is_a_no_op(storage: Any) -> None:
    saga_id = await create(storage)
    before = await snapshot(storage, saga_id)
    async with storage.create_run() as run:
        await run.commit()
        await run.commit()
        assert await snapshot(storage, saga_id) == before

        await commit_checkpoint(run, saga_id)
        after = await snapshot(storage, saga_id)
        await run.commit()
        assert await snapshot(storage, saga_id) == after
    assert after[0].version == 2


async def test_every_commit_bumps_the_version_by_exactly_one(storage: Any) -> None:
    saga_id = await create(storage)
    checkpoints: list[dict[str, Any]] = [
        {"steps": ("log_only",)},
        {"steps": (), "context": {"n": 1}},
        {"steps": (), "status": SagaStatus.RUNNING},
        {"steps": ("a", "b", "c"), "context": {"n": 2}, "status": SagaStatus.COMPENSATING},
        {"steps": (), "context": {"n": 3}, "current_version": 5},
    ]
    async with storage.create_run() as run:
        for expected_version, checkpoint in enumerate(checkpoints, start=2):
            await commit_checkpoint(run, saga_id, **checkpoint)
            assert (await storage.get_saga(saga_id)).version == expected_version
        await run.reset_recovery_attempts(saga_id)
        await run.commit()
    state = await storage.get_saga(saga_id)
    assert (state.version, state.status, state.context) == (7, SagaStatus.COMPENSATING, {"n": 3})


async def test_several_updates_of_one_checkpoint_keep_the_last(storage: Any) -> None:
    saga_id = await create(storage)
    async with storage.create_run() as run:
        await run.update_context(saga_id, {"n": 1})
        await run.update_status(saga_id, SagaStatus.RUNNING)
        await run.update_context(saga_id, {"n": 2})
        await run.update_status(saga_id, SagaStatus.COMPENSATING)
        await run.commit()
    assert await storage.load_saga_state(saga_id) == (SagaStatus.COMPENSATING, {"n": 2}, 2)


async def test_a_run_buffers_one_saga_at_a_time(storage: Any) -> None:
    first, second = await create(storage), await create(storage)
    before = await snapshot(storage, second)

    async def buffer_two() -> None:
        async with storage.create_run() as run:
            await run.log_step(first, "reserve", "act", SagaStepStatus.COMPLETED)
            await run.update_context(second, {"other": True})
            await run.commit()

    with pytest.raises(SagaError):
        await buffer_two()
    assert await snapshot(storage, second) == before


async def test_a_checkpoint_with_a_stale_version_writes_nothing(storage: Any) -> None:
    saga_id = await create(storage, {"n": 0})
    async with storage.create_run() as run:
        await buffer_checkpoint(
            run, saga_id, steps=("reserve", "charge"), context={"n": 1},
            status=SagaStatus.RUNNING, current_version=1,
        )
        await storage.update_context(saga_id, {"n": "someone else"})  # now version 2

        await assert_writes_nothing(storage, saga_id, SagaConcurrencyError, run.commit)

    state, history = await snapshot(storage, saga_id)
    assert (state.status, state.context, state.version) == (
        SagaStatus.PENDING, {"n": "someone else"}, 2,
    )
    assert history == []


async def test_leaving_a_run_drops_what_it_did_not_commit(storage: Any) -> None:
    saga_id = await create(storage)
    before = await snapshot(storage, saga_id)

    async with storage.create_run() as run:
        await buffer_checkpoint(run, saga_id, context={"n": 1}, status=SagaStatus.RUNNING)
    assert await snapshot(storage, saga_id) == before

    async def fail_mid_checkpoint() -> None:
        async with storage.create_run() as run:
            await buffer_checkpoint(run, saga_id, context={"n": 2}, status=SagaStatus.FAILED)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await fail_mid_checkpoint()
    assert await snapshot(storage, saga_id) == before


async def test_runs_do_not_share_buffers(storage: Any) -> None:
    saga_id = await create(storage)
    async with storage.create_run() as first, storage.create_run() as second:
        await buffer_checkpoint(first, saga_id, steps=("first",), context={"by": "first"})
        await commit_checkpoint(second, saga_id, steps=("second",))
        assert [e.step_name for e in await storage.get_step_history(saga_id)] == ["second"]
        await first.rollback()
    state, history = await snapshot(storage, saga_id)
    assert (state.context, state.version) == ({"n": 0}, 2)
    assert [e.step_name for e in history] == ["second"]
