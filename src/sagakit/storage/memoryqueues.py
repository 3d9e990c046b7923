"""The memory storage's queues: submitted sagas, queue limits and in-process wake-ups.

A part of :class:`~sagakit.storage.memory.MemorySagaStorage` (a mixin over its rows), kept
apart for size. It keeps the same contract as the SQL storage (tests/contract/test_queues.py),
with the same pure decisions (:func:`sagakit.queue.pick`, :func:`sagakit.queue.refill`).
Wake-ups (:meth:`MemoryQueues.listen`) reach callbacks in this process: a submit, a queued
saga's lease released, and a queued saga's durable wait falling due.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from uuid import UUID

from sagakit.queue import (
    QueueSettings,
    check_key,
    check_priority,
    check_queue_name,
    pick,
    refill,
)
from sagakit.records import RECOVERABLE_STATUSES, SagaState, SagaStatus

__all__ = ["MemoryQueues"]


class MemoryQueues:
    """Queue operations over a memory storage's rows (see the module docstring)."""

    clock: Callable[[], float]
    _rows: dict[int, Any]
    _queues: dict[str, tuple[QueueSettings, float | None, float | None]]
    _listeners: list[Callable[[str], object]]

    def _insert(self, saga_id: UUID, name: str, context: Mapping[str, Any], now: float) -> Any:
        raise NotImplementedError

    def _dump_context(self, saga_id: UUID, context: Mapping[str, Any]) -> bytes:
        raise NotImplementedError

    def _mark_claimed(self, row: Any, now: float, *, count_attempt: bool) -> None:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def listen(self, callback: Callable[[str], object]) -> AsyncIterator[None]:
        """Call ``callback(queue)`` while inside: when a saga is submitted to ``queue``, when
        one of its sagas releases its lease, and when one's durable wait falls due."""
        self._listeners.append(callback)
        try:
            yield
        finally:
            self._listeners.remove(callback)

    def _notify(self, queue: str, delay: float = 0.0) -> None:
        for callback in list(self._listeners):
            if delay > 0:
                asyncio.get_running_loop().call_later(delay, callback, queue)
            else:
                callback(queue)

    async def submit(
        self,
        saga_id: UUID,
        name: str,
        context: Mapping[str, Any],
        *,
        queue: str,
        concurrency_key: str | None = None,
        priority: int = 0,
        fingerprint: str | None = None,
        deadline_seconds: float | None = None,
    ) -> bool:
        check_queue_name(queue)  # refused before anything is written, as the SQL storage does
        check_key(concurrency_key)
        check_priority(priority)
        data = self._dump_context(saga_id, context)
        if saga_id.int in self._rows:
            return False
        now = self.clock()
        row = self._insert(saga_id, name, {}, now)
        row.context, row.fingerprint = data, fingerprint
        row.queue, row.concurrency_key, row.priority = queue, concurrency_key, priority
        if deadline_seconds is not None:
            row.deadline_at = now + deadline_seconds
        self._notify(queue)
        return True

    async def claim_queued(
        self,
        owner: str,
        queue: str,
        *,
        limit: int,
        lease_seconds: float,
        max_recovery_attempts: int = 5,
        saga_names: frozenset[str] | None = None,
    ) -> list[SagaState]:
        now = self.clock()
        limits, tokens, refilled_at = self._queues.get(queue, (None, None, None))
        available = float("inf") if limits is None else refill(limits, tokens, refilled_at, now)
        mine = [row for row in self._rows.values() if row.queue == queue]
        running_by_key: dict[str, int] = {}
        running = 0
        for row in mine:
            if row.running(now):
                running += 1
                if row.concurrency_key is not None:
                    key = row.concurrency_key
                    running_by_key[key] = running_by_key.get(key, 0) + 1
        due = sorted(
            (row for row in mine
             if row.status in RECOVERABLE_STATUSES
             and row.recovery_attempts <= max_recovery_attempts
             and row.lease_free(now, owner)
             and (row.next_attempt_at is None or row.next_attempt_at <= now)
             and (saga_names is None or row.name in saga_names)),
            key=lambda r: (-r.priority, r.created_at, r.sequence))
        taken = pick(limits, [(row, row.concurrency_key) for row in due], want=limit,
                     running=running, running_by_key=running_by_key, tokens=available)
        for row in taken:
            row.lease_owner, row.lease_expires_at = owner, now + lease_seconds
            self._mark_claimed(row, now, count_attempt=row.status is not SagaStatus.PENDING)
        if limits is not None and limits.rate is not None and taken:
            self._queues[queue] = (limits, available - len(taken), now)
        return [row.state() for row in taken]

    async def set_queue(self, settings: QueueSettings) -> None:
        _, tokens, refilled_at = self._queues.get(settings.name, (None, None, None))
        self._queues[settings.name] = (settings, tokens, refilled_at)

    async def get_queues(self) -> list[QueueSettings]:
        return [self._queues[name][0] for name in sorted(self._queues)]

    async def delete_queue(self, name: str) -> bool:
        return self._queues.pop(name, None) is not None

    async def queue_counts(self) -> dict[str, dict[SagaStatus, int]]:
        counts: dict[str, dict[SagaStatus, int]] = {}
        for row in self._rows.values():
            if row.queue is not None:
                by_status = counts.setdefault(row.queue, {})
                by_status[row.status] = by_status.get(row.status, 0) + 1
        return counts
