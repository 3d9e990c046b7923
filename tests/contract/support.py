"""Helpers for the storage contract suite.

Everything here goes through the public protocol only (``SagaStorage`` methods, ``create_run()``
and the run's methods), so the same helpers serve every backend.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import pytest

from sagakit.records import SagaLogEntry, SagaState, SagaStatus, SagaStepStatus

NAME = "order"
LONG_LEASE = 60.0
SHORT_LEASE = 0.3  # long enough that a noisy machine does not let it run out between two calls
EXPIRY_WAIT = 0.5  # comfortably longer than SHORT_LEASE; never asserted as a duration
TICK = 0.02  # separates timestamps so "oldest/newest first" orderings are unambiguous

Snapshot = tuple[SagaState, list[SagaLogEntry]]


def new_id() -> UUID:
    return uuid.uuid4()


async def create(
    storage: Any,
    context: dict[str, Any] | None = None,
    *,
    name: str = NAME,
    status: SagaStatus | None = None,
) -> UUID:
    """Create a saga commit-per-call (optionally moving it to ``status``); return its id."""
    saga_id = new_id()
    await storage.create_saga(saga_id, name, {"n": 0} if context is None else context)
    if status is not None and status is not SagaStatus.PENDING:
        await storage.update_status(saga_id, status)
    return saga_id


async def snapshot(storage: Any, saga_id: UUID) -> Snapshot:
    """Everything stored about one saga: its row and its step history."""
    return await storage.get_saga(saga_id), await storage.get_step_history(saga_id)


async def assert_writes_nothing(
    storage: Any,
    saga_id: UUID,
    error: type[BaseException],
    action: Callable[[], Awaitable[Any]],
) -> None:
    """``action()`` raises ``error`` and leaves the saga's row and history exactly as they were."""
    before = await snapshot(storage, saga_id)
    with pytest.raises(error):
        await action()
    assert await snapshot(storage, saga_id) == before


def key_fields(state: SagaState) -> tuple[Any, ...]:
    """The fields of a state a storage must return exactly (timestamps left out)."""
    return (
        state.saga_id,
        state.name,
        state.status,
        state.context,
        state.version,
        state.recovery_attempts,
        state.lease_owner,
        state.fingerprint,
    )


async def buffer_checkpoint(
    run: Any,
    saga_id: UUID,
    *,
    context: dict[str, Any] | None = None,
    status: SagaStatus | None = None,
    steps: tuple[str, ...] = ("reserve",),
    current_version: int | None = None,
) -> None:
    """Buffer a typical checkpoint: one COMPLETED act entry per step, a context, a status."""
    for step in steps:
        await run.log_step(saga_id, step, "act", SagaStepStatus.COMPLETED)
    if context is not None:
        await run.update_context(saga_id, context, current_version)
    if status is not None:
        await run.update_status(saga_id, status)


async def commit_checkpoint(run: Any, saga_id: UUID, **checkpoint: Any) -> None:
    """Buffer a checkpoint (see :func:`buffer_checkpoint`) and commit it."""
    await buffer_checkpoint(run, saga_id, **checkpoint)
    await run.commit()


async def wait_for_expiry() -> None:
    """Let every SHORT_LEASE lease run out."""
    await asyncio.sleep(EXPIRY_WAIT)


async def tick() -> None:
    """Make the next write's timestamp later than the previous one's."""
    await asyncio.sleep(TICK)
