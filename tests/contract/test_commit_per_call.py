"""Contract: the commit-per-call methods of ``SagaStorage`` (each mutating call is one write)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from sagakit.exceptions import SagaConcurrencyError, SagaError, SagaNotFoundError
from sagakit.records import SagaAction, SagaStatus, SagaStepStatus
from tests.contract.support import NAME, assert_writes_nothing, create, new_id, snapshot


async def test_create_saga_is_pending_at_version_1(storage: Any) -> None:
    saga_id = new_id()
    await storage.create_saga(saga_id, NAME, {"a": 1})

    state = await storage.get_saga(saga_id)
    assert state.saga_id == saga_id
    assert state.name == NAME
    assert state.status is SagaStatus.PENDING
    assert state.context == {"a": 1}
    assert state.version == 1
    assert state.recovery_attempts == 0
    assert state.lease_owner is None
    assert await storage.load_saga_state(saga_id) == (SagaStatus.PENDING, {"a": 1}, 1)
    assert await storage.get_step_history(saga_id) == []


async def test_saga_timestamps_are_timezone_aware(storage: Any) -> None:
    state = await storage.get_saga(await create(storage))
    assert state.created_at is not None
    assert state.updated_at is not None
    assert state.created_at.utcoffset() is not None
    assert state.updated_at.utcoffset() is not None
    assert state.created_at <= state.updated_at


async def test_create_saga_with_existing_id_raises_and_keeps_the_original(storage: Any) -> None:
    saga_id = await create(storage, {"first": True})

    await assert_writes_nothing(
        storage, saga_id, SagaConcurrencyError,
        lambda: storage.create_saga(saga_id, "other", {"second": True}),
    )
    assert (await storage.get_saga(saga_id)).name == NAME


async def test_update_context_replaces_the_context_and_bumps_the_version(storage: Any) -> None:
    saga_id = await create(storage, {"old": 1, "kept": "no"})

    await storage.update_context(saga_id, {"new": 2})

    assert await storage.load_saga_state(saga_id) == (SagaStatus.PENDING, {"new": 2}, 2)


async def test_update_context_with_the_current_version_writes(storage: Any) -> None:
    saga_id = await create(storage)
    await storage.update_context(saga_id, {"n": 1}, current_version=1)
    await storage.update_context(saga_id, {"n": 2}, current_version=2)

    assert await storage.load_saga_state(saga_id) == (SagaStatus.PENDING, {"n": 2}, 3)


async def test_update_context_with_a_stale_version_writes_nothing(storage: Any) -> None:
    saga_id = await create(storage)
    await storage.update_context(saga_id, {"n": 1})  # now at version 2

    await assert_writes_nothing(
        storage, saga_id, SagaConcurrencyError,
        lambda: storage.update_context(saga_id, {"n": 99}, current_version=1),
    )
    await assert_writes_nothing(
        storage, saga_id, SagaConcurrencyError,
        lambda: storage.update_context(saga_id, {"n": 99}, current_version=3),
    )


async def test_update_status_sets_the_status_and_bumps_the_version(storage: Any) -> None:
    saga_id = await create(storage, {"n": 7})
    expected_version = 1
    for status in (SagaStatus.RUNNING, SagaStatus.COMPENSATING, SagaStatus.FAILED):
        await storage.update_status(saga_id, status)
        expected_version += 1
        assert await storage.load_saga_state(saga_id) == (status, {"n": 7}, expected_version)


async def test_log_step_appends_entries_in_write_order_with_all_fields(storage: Any) -> None:
    saga_id = await create(storage)
    written = [
        ("reserve", "act", SagaStepStatus.STARTED, None, None),
        ("reserve", "act", SagaStepStatus.COMPLETED, None, None),
        ("charge", "act", SagaStepStatus.FAILED, "card declined: ünïcödé", "PaymentError"),
        ("reserve", "compensate", SagaStepStatus.COMPENSATED, None, None),
        ("charge", "compensate", SagaStepStatus.FAILED, None, "TimeoutError"),
    ]
    for step_name, action, status, details, error_type in written:
        await storage.log_step(saga_id, step_name, action, status, details, error_type=error_type)

    history = await storage.get_step_history(saga_id)
    assert [
        (e.step_name, e.action, e.status, e.details, e.error_type) for e in history
    ] == [(s, SagaAction(a), st, d, et) for s, a, st, d, et in written]
    assert all(e.saga_id == saga_id for e in history)
    assert all(isinstance(e.action, SagaAction) for e in history)
    assert all(isinstance(e.status, SagaStepStatus) for e in history)
    for entry in history:
        assert entry.timestamp.utcoffset() is not None
    timestamps = [e.timestamp for e in history]
    assert timestamps == sorted(timestamps)
    assert (await storage.get_saga(saga_id)).version == 1 + len(written)


async def test_log_entry_timestamps_are_close_to_the_saga_timestamps(storage: Any) -> None:
    saga_id = await create(storage)
    await storage.log_step(saga_id, "reserve", "act", SagaStepStatus.COMPLETED)

    state = await storage.get_saga(saga_id)
    [entry] = await storage.get_step_history(saga_id)
    assert state.created_at is not None
    # same clock and same time zone: minutes apart would mean a naive/aware or UTC/local mix-up
    assert abs(entry.timestamp - state.created_at) < timedelta(minutes=5)


async def test_step_history_is_per_saga(storage: Any) -> None:
    first, second = await create(storage), await create(storage)
    await storage.log_step(first, "a", "act", SagaStepStatus.COMPLETED)
    await storage.log_step(second, "b", "act", SagaStepStatus.COMPLETED)

    assert [e.step_name for e in await storage.get_step_history(first)] == ["a"]
    assert [e.step_name for e in await storage.get_step_history(second)] == ["b"]


async def test_reads_of_an_unknown_id(storage: Any) -> None:
    unknown = new_id()
    with pytest.raises(SagaNotFoundError) as raised:
        await storage.load_saga_state(unknown)
    assert isinstance(raised.value, SagaError)
    assert isinstance(raised.value, LookupError)
    with pytest.raises(SagaNotFoundError):
        await storage.load_saga_state(unknown, read_for_update=True)
    with pytest.raises(SagaNotFoundError):
        await storage.get_saga(unknown)
    assert await storage.get_step_history(unknown) == []


async def test_stored_context_is_not_shared_with_the_caller(storage: Any) -> None:
    context: dict[str, Any] = {"items": [1, 2], "meta": {"k": "v"}}
    saga_id = new_id()
    await storage.create_saga(saga_id, NAME, context)
    context["items"].append(3)
    context["meta"]["k"] = "changed"

    _, loaded, _ = await storage.load_saga_state(saga_id)
    assert loaded == {"items": [1, 2], "meta": {"k": "v"}}
    loaded["items"].clear()
    (await storage.get_saga(saga_id)).context["meta"].clear()

    assert (await storage.get_saga(saga_id)).context == {"items": [1, 2], "meta": {"k": "v"}}


async def test_increment_recovery_attempts(storage: Any) -> None:
    saga_id = await create(storage, {"n": 1})

    await storage.increment_recovery_attempts(saga_id)
    state = await storage.get_saga(saga_id)
    assert (state.recovery_attempts, state.status, state.version) == (1, SagaStatus.PENDING, 2)

    await storage.increment_recovery_attempts(saga_id, SagaStatus.RUNNING)
    state = await storage.get_saga(saga_id)
    assert (state.recovery_attempts, state.status, state.version) == (2, SagaStatus.RUNNING, 3)
    assert state.context == {"n": 1}


async def test_set_recovery_attempts(storage: Any) -> None:
    saga_id = await create(storage)

    await storage.set_recovery_attempts(saga_id, 4)
    assert (await storage.get_saga(saga_id)).recovery_attempts == 4
    await storage.increment_recovery_attempts(saga_id)
    assert (await storage.get_saga(saga_id)).recovery_attempts == 5
    await storage.set_recovery_attempts(saga_id, 0)

    state, history = await snapshot(storage, saga_id)
    assert state.recovery_attempts == 0
    assert state.status is SagaStatus.PENDING
    assert history == []
