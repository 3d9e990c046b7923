"""Handing sagas to workers: :func:`submit` and the :class:`SubmittedSaga` handle.

``await OrderSaga().submit(context, storage=storage, queue="orders")`` (or
``mediator.submit(context)``, or ``sagakit submit``) checks the context and the options, stores
the saga PENDING in its queue in one commit and returns at once: a worker serving the queue
(:class:`sagakit.RecoveryWorker` with ``queues=[...]``, ``sagakit worker --queue``) runs it
within the queue's limits (:mod:`sagakit.queue`). The handle reads the stored saga: await its
outcome, or stream its step log as workers write it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sagakit import settings
from sagakit.context import codec_for
from sagakit.exceptions import SagaSerializationError, SagaStorageError
from sagakit.queue import DEFAULT_QUEUE, check_key, check_priority, check_queue_name
from sagakit.records import TERMINAL_STATUSES, ContextJSON, SagaLogEntry, SagaState, SagaStatus
from sagakit.storage.run import wrong_saga

if TYPE_CHECKING:
    from sagakit.saga import Saga
    from sagakit.storage.protocol import SagaStorage

__all__ = ["SubmittedSaga", "submit"]

SETTLED = TERMINAL_STATUSES | {SagaStatus.PARKED}
"""The statuses a submitted saga rests in once workers are done with it (until an operator
resumes a PARKED one)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SubmittedSaga:
    """A saga handed to workers. ``created`` is False when a saga with this id was already
    stored (a repeated submit writes nothing; the handle follows the stored saga)."""

    saga_id: UUID
    saga_name: str
    queue: str
    storage: SagaStorage
    created: bool = True

    async def state(self) -> SagaState:
        """The saga as stored now."""
        return await self.storage.get_saga(self.saga_id)

    async def outcome(self, *, poll: float = 0.05, max_poll: float = 1.0) -> SagaState:
        """Wait until the saga is COMPLETED, FAILED or PARKED and return it as stored (its
        status, its final context). Reads the storage every ``poll`` seconds, backing off to
        ``max_poll`` while nothing changes. Bound the wait with ``asyncio.timeout()`` (the saga
        goes on regardless); storage faults raise as the storage's errors."""
        async for _ in self._follow(poll, max_poll, with_steps=False):
            pass
        return await self.state()

    async def steps(self, *, poll: float = 0.05,
                    max_poll: float = 1.0) -> AsyncIterator[SagaLogEntry]:
        """The saga's step log entries, each once, in write order, as workers write them
        (failed attempts and compensations included); ends when the saga is COMPLETED, FAILED
        or PARKED. Polling as in :meth:`outcome`."""
        async for entry in self._follow(poll, max_poll, with_steps=True):
            yield entry

    async def _follow(self, poll: float, max_poll: float, *,
                      with_steps: bool) -> AsyncIterator[SagaLogEntry]:
        poll = settings.seconds("poll", poll, exclusive=True)
        max_poll = settings.seconds("max_poll", max_poll, minimum=poll)
        seen = 0
        wait = poll
        last_version = -1
        while True:
            state = await self.state()
            if with_steps and state.version != last_version:
                history = await self.storage.get_step_history(self.saga_id)
                for entry in history[seen:]:
                    yield entry
                seen = max(seen, len(history))
            if state.status in SETTLED:
                return
            wait = poll if state.version != last_version else min(wait * 2, max_poll)
            last_version = state.version
            await asyncio.sleep(wait)


async def submit(
    saga: Saga[Any],
    context: Any,
    *,
    storage: SagaStorage,
    queue: str = DEFAULT_QUEUE,
    concurrency_key: str | None = None,
    priority: int = 0,
    saga_id: UUID | None = None,
) -> SubmittedSaga:
    """Store ``saga`` PENDING in ``queue`` for workers to run, in one commit, and return its
    handle at once.

    Checked before anything is written: the queue name, ``concurrency_key`` and ``priority``
    (ValueError naming the option), the context (SagaSerializationError naming the saga). A
    storage that cannot take submitted sagas (no ``submit``) raises SagaStorageError. With the
    ``saga_id`` of a stored saga nothing is written: the handle follows it (``created`` False),
    unless it is another saga's id (SagaDefinitionError)."""
    check_queue_name(queue)
    check_key(concurrency_key)
    check_priority(priority)
    saga_id = saga_id if saga_id is not None else uuid.uuid4()
    codec = codec_for(saga.context_type or type(context))
    try:
        data = ContextJSON(codec.encode_json(context))
    except SagaSerializationError as exc:
        raise SagaSerializationError(
            f"saga {saga.name!r} {saga_id}: {exc.message}", field=exc.field, saga_id=saga_id,
            saga_name=saga.name,
        ) from exc
    method = getattr(storage, "submit", None)
    if method is None:
        raise SagaStorageError(
            f"saga {saga.name!r}: {type(storage).__name__} cannot take submitted sagas (it "
            "has no submit()); use one of sagakit's storages", saga_id=saga_id,
            saga_name=saga.name)
    try:
        created = await method(saga_id, saga.name, data, queue=queue,
                               concurrency_key=concurrency_key, priority=priority,
                               fingerprint=saga.fingerprint or None,
                               deadline_seconds=saga.deadline)
    except NotImplementedError:
        raise SagaStorageError(
            f"saga {saga.name!r}: {type(storage).__name__} cannot take submitted sagas",
            saga_id=saga_id, saga_name=saga.name) from None
    if not created:
        stored = await storage.get_saga(saga_id)
        if stored.name != saga.name:
            raise wrong_saga(saga_id, stored.name, saga.name)
        return SubmittedSaga(saga_id, saga.name, stored.queue or queue, storage, created=False)
    return SubmittedSaga(saga_id, saga.name, queue, storage)
