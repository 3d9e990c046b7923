"""In-process storage: every guarantee of the SQL storage, kept in dicts.

Contexts are stored as JSON bytes, so a context the SQL storage would refuse is refused here too,
and a stored context can never be changed through a reference the caller still holds. It passes
the same contract suite as the SQL storage. Data lives as long as the storage object: use it for
tests and for sagas that need no durability across processes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson

from sagakit import settings
from sagakit.exceptions import (
    SagaBusyError,
    SagaConcurrencyError,
    SagaLeaseLostError,
    SagaNotFoundError,
    SagaSerializationError,
)
from sagakit.queue import QueueSettings
from sagakit.records import (
    RECOVERABLE_STATUSES,
    TERMINAL_STATUSES,
    SagaLogEntry,
    SagaState,
    SagaStatus,
    context_json,
)
from sagakit.storage.listener import parse_wake
from sagakit.storage.liveness import BUSY, LIVE_MARK, ORPHANS, QUIET, Liveness, owner_is_dead
from sagakit.storage.memoryqueues import MemoryQueues
from sagakit.storage.run import (
    BufferedRun,
    Checkpoint,
    PendingEntry,
    RunBackedStorage,
    refuse_nul,
    wrong_saga,
)

__all__ = ["MemorySagaStorage"]


@dataclasses.dataclass(slots=True)
class _Row:
    saga_id: UUID
    name: str
    status: SagaStatus
    context: bytes
    version: int
    created_at: float
    updated_at: float
    recovery_attempts: int = 0
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    fingerprint: str | None = None
    next_attempt_at: float | None = None
    past_pivot: bool = False
    deadline_at: float | None = None
    queue: str | None = None
    concurrency_key: str | None = None
    priority: int = 0
    sequence: int = 0  # insertion order, for "newest first" among equal timestamps

    def state(self) -> SagaState:
        return SagaState(
            saga_id=self.saga_id,
            name=self.name,
            status=self.status,
            context=orjson.loads(self.context),
            version=self.version,
            recovery_attempts=self.recovery_attempts,
            created_at=_dt(self.created_at),
            updated_at=_dt(self.updated_at),
            lease_owner=self.lease_owner,
            lease_expires_at=None if self.lease_expires_at is None else _dt(self.lease_expires_at),
            fingerprint=self.fingerprint,
            next_attempt_at=None if self.next_attempt_at is None else _dt(self.next_attempt_at),
            past_pivot=self.past_pivot,
            deadline_at=None if self.deadline_at is None else _dt(self.deadline_at),
            queue=self.queue,
            concurrency_key=self.concurrency_key,
            priority=self.priority,
        )

    def running(self, now: float) -> bool:
        """RUNNING or COMPENSATING under a live lease (what a queue's limits count)."""
        return ((self.status is SagaStatus.RUNNING or self.status is SagaStatus.COMPENSATING)
                and not self.lease_free(now))

    def lease_free(self, now: float, claimer: str = "") -> bool:
        """Whether ``claimer`` may take the lease: none, run out, or another owner's whose
        liveness session is closed (see :meth:`sagakit.storage.dialect.Dialect.lease_free`)."""
        return (self.lease_owner is None or (self.lease_expires_at or 0.0) <= now
                or (self.lease_owner != claimer and owner_is_dead(self.lease_owner)))


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _dump(saga_id: UUID, context: Mapping[str, Any]) -> bytes:
    try:
        data = context_json(context)
    except TypeError as exc:
        raise SagaSerializationError(
            f"saga {saga_id}: context is not JSON-serialisable: {exc}", saga_id=saga_id
        ) from exc
    if b"\\u0000" in data:  # the common case costs one scan, no call
        refuse_nul(saga_id, data)
    return data


class MemorySagaStorage(MemoryQueues, RunBackedStorage):
    """Sagas kept in this process's memory. ``clock`` (seconds since the epoch) drives lease
    expiry and timestamps; tests pass a fake one."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        # Keyed by ``UUID.int``: hashing an int is far cheaper than UUID.__hash__.
        self._rows: dict[int, _Row] = {}
        self._logs: dict[int, list[tuple[PendingEntry, float]]] = {}
        self._sequence = 0  # insertion order, for "newest first" among equal timestamps
        # Queue name -> (its limits, rate-limit tokens left, when they were counted).
        self._queues: dict[str, tuple[QueueSettings, float | None, float | None]] = {}
        self._listeners: list[Callable[[str], object]] = []

    def _dump_context(self, saga_id: UUID, context: Mapping[str, Any]) -> bytes:
        return _dump(saga_id, context)

    def _mark_claimed(self, row: _Row, now: float, *, count_attempt: bool) -> None:
        _claimed(row, now, count_attempt=count_attempt)

    def _new_run(self) -> _MemoryRun:
        return _MemoryRun(self)

    def _row(self, saga_id: UUID) -> _Row:
        row = self._rows.get(saga_id.int)
        if row is None:
            raise SagaNotFoundError(f"no saga with id {saga_id}", saga_id=saga_id)
        return row

    # -- reads ----------------------------------------------------------------------------------

    async def load_saga_state(
        self, saga_id: UUID, *, read_for_update: bool = False
    ) -> tuple[SagaStatus, dict[str, Any], int]:
        row = self._row(saga_id)
        return row.status, orjson.loads(row.context), row.version

    async def get_saga(self, saga_id: UUID) -> SagaState:
        return self._row(saga_id).state()

    async def get_step_history(self, saga_id: UUID) -> list[SagaLogEntry]:
        return [
            SagaLogEntry(saga_id, e.step_name, e.action, e.status, _dt(when), e.details,
                         e.error_type, e.attempt)
            for e, when in self._logs.get(saga_id.int, ())
        ]

    async def get_sagas_for_recovery(
        self,
        limit: int,
        max_recovery_attempts: int = 5,
        stale_after_seconds: float | None = None,
        saga_name: str | None = None,
    ) -> list[UUID]:
        now = self.clock()
        due = [
            row
            for row in self._rows.values()
            if row.status in RECOVERABLE_STATUSES
            and row.queue is None
            and row.recovery_attempts <= max_recovery_attempts
            and row.lease_free(now)
            and (row.next_attempt_at is None or row.next_attempt_at <= now)
            and (saga_name is None or row.name == saga_name)
            and (stale_after_seconds is None or row.updated_at <= now - stale_after_seconds)
        ]
        due.sort(key=lambda r: (r.updated_at, r.sequence))
        return [row.saga_id for row in due[:limit]]

    async def claim_due(
        self,
        owner: str,
        *,
        limit: int,
        lease_seconds: float,
        max_recovery_attempts: int = 5,
        saga_names: frozenset[str] | None = None,
        stale_after_seconds: float | None = None,
    ) -> list[SagaState]:
        due = await self.get_sagas_for_recovery(
            len(self._rows), max_recovery_attempts, stale_after_seconds
        )
        claimed: list[SagaState] = []
        now = self.clock()
        for saga_id in due:
            row = self._rows[saga_id.int]
            if ((saga_names is not None and row.name not in saga_names)
                    or not row.lease_free(now, owner)):
                continue
            row.lease_owner, row.lease_expires_at = owner, now + lease_seconds
            _claimed(row, now, count_attempt=True)
            claimed.append(row.state())
            if len(claimed) == limit:
                break
        return claimed

    async def list_sagas(
        self,
        *,
        statuses: frozenset[SagaStatus] | None = None,
        saga_name: str | None = None,
        limit: int = 100,
    ) -> list[SagaState]:
        rows = [
            row
            for row in self._rows.values()
            if (statuses is None or row.status in statuses)
            and (saga_name is None or row.name == saga_name)
        ]
        rows.sort(key=lambda r: (r.created_at, r.sequence), reverse=True)
        return [row.state() for row in rows[:limit]]

    # -- commit-per-call writes that are not plain checkpoints -------------------------------

    async def increment_recovery_attempts(
        self, saga_id: UUID, new_status: SagaStatus | None = None
    ) -> None:
        row = self._row(saga_id)
        row.recovery_attempts += 1
        if new_status is not None:
            row.status = SagaStatus(new_status)
        row.version += 1
        row.updated_at = self.clock()

    def liveness(self) -> Liveness:
        """A worker's liveness (see :mod:`sagakit.storage.liveness`): sagas claimed under its
        owner id are free for others once it is closed, whatever their lease says."""
        return Liveness(watch=self._look)

    async def _look(self, owner: str) -> int:
        now = self.clock()
        found = QUIET
        for row in self._rows.values():
            if ((row.status is SagaStatus.RUNNING or row.status is SagaStatus.COMPENSATING)
                    and row.lease_owner is not None and row.lease_owner[:1] == LIVE_MARK
                    and row.lease_owner != owner and (row.lease_expires_at or 0.0) > now):
                if owner_is_dead(row.lease_owner):
                    return ORPHANS
                found = BUSY
        return found

    async def set_recovery_attempts(self, saga_id: UUID, attempts: int) -> None:
        row = self._row(saga_id)
        row.recovery_attempts = attempts
        row.version += 1
        row.updated_at = self.clock()

    async def close(self) -> None:
        """Nothing to release; here for symmetry with the SQL storage."""

    # -- primitives used by runs --------------------------------------------------------------

    def _write(self, cp: Checkpoint) -> int:
        now = self.clock()
        if cp.create_name is not None:
            if cp.saga_id.int in self._rows:
                raise SagaConcurrencyError(
                    f"saga {cp.saga_id} already exists", saga_id=cp.saga_id
                )
            row = self._insert(cp.saga_id, cp.create_name, cp.context or {}, now)
            row.status = cp.status or SagaStatus.PENDING
        else:
            row = self._row(cp.saga_id)
            self._check_fence(row, cp, now)
            context = None if cp.context is None else _dump(cp.saga_id, cp.context)
            if context is not None:
                row.context = context
            if cp.status is not None:
                row.status = cp.status
            if cp.reset_attempts:
                row.recovery_attempts = 0
            if cp.wait_seconds is not None:
                row.next_attempt_at = now + cp.wait_seconds
            elif cp.clear_wait:
                row.next_attempt_at = None
            if cp.past_pivot:
                row.past_pivot = True
            row.version += 1
            row.updated_at = now
            if cp.releases_lease:
                row.lease_owner = row.lease_expires_at = None
                if cp.wake is not None and self._listeners:  # a slot or a wait for workers
                    self._notify(*parse_wake(cp.wake))
            elif cp.lease_seconds is not None:
                row.lease_expires_at = now + cp.lease_seconds
        if cp.entries:  # kept as (entry, time); SagaLogEntry records are built when read
            log = self._logs.setdefault(cp.saga_id.int, [])
            for e in cp.entries:
                log.append((e, now))
        return row.version

    def _check_fence(self, row: _Row, cp: Checkpoint, now: float) -> None:
        if cp.fence_owner is not None and row.lease_owner != cp.fence_owner:
            raise SagaLeaseLostError(
                f"saga {row.saga_id}: this run's lease was taken over by {row.lease_owner!r}",
                saga_id=row.saga_id,
                saga_name=row.name,
            )
        for expected in (cp.fence_version, cp.expected_version):
            if expected is not None and row.version != expected:
                raise SagaConcurrencyError(
                    f"saga {row.saga_id}: expected version {expected}, found {row.version}",
                    saga_id=row.saga_id,
                    saga_name=row.name,
                )

    def _insert(self, saga_id: UUID, name: str, context: Mapping[str, Any], now: float) -> _Row:
        row = _Row(saga_id, name, SagaStatus.PENDING, _dump(saga_id, context), 1, now, now)
        self._rows[saga_id.int] = row
        self._sequence += 1
        row.sequence = self._sequence
        return row

    def _claim(
        self, run: _MemoryRun, saga_id: UUID, lease_seconds: float, count_attempt: bool,
        allow_parked: bool, name: str | None,
    ) -> SagaState:
        row = self._row(saga_id)
        if name is not None and row.name != name:
            raise wrong_saga(saga_id, row.name, name)
        now = self.clock()
        if row.status in TERMINAL_STATUSES or (row.status is SagaStatus.PARKED and not allow_parked):
            return row.state()
        if row.lease_owner != run.owner and not row.lease_free(now):
            raise SagaBusyError(
                f"saga {saga_id} is being run by {row.lease_owner}", saga_id=saga_id, saga_name=row.name
            )
        row.lease_owner = run.owner
        row.lease_expires_at = now + lease_seconds
        _claimed(row, now, count_attempt=count_attempt)
        return row.state()


def _same_version(row: _Row, version: int | None) -> bool:
    """Whether a run that last saw ``version`` still has the saga as it left it: a later claim
    (even under the same owner id, by the same worker) wrote a newer one."""
    return version is None or row.version == version


def _claimed(row: _Row, now: float, *, count_attempt: bool) -> None:
    """What a claim writes besides the lease: a new version, a recovery attempt (none for a
    WAITING saga), and RUNNING for a PENDING or WAITING saga."""
    row.version += 1
    row.updated_at = now
    if row.status is SagaStatus.WAITING:
        row.status = SagaStatus.RUNNING
    else:
        if count_attempt:
            row.recovery_attempts += 1
        if row.status is SagaStatus.PENDING:
            row.status = SagaStatus.RUNNING


class _MemoryRun(BufferedRun):
    def __init__(self, storage: MemorySagaStorage) -> None:
        super().__init__()
        self._storage = storage

    async def _write(self, checkpoint: Checkpoint) -> int:
        return self._storage._write(checkpoint)

    async def load_saga_state(
        self, saga_id: UUID, *, read_for_update: bool = False
    ) -> tuple[SagaStatus, dict[str, Any], int]:
        return await self._storage.load_saga_state(saga_id)

    async def get_step_history(self, saga_id: UUID) -> list[SagaLogEntry]:
        return await self._storage.get_step_history(saga_id)

    async def start(
        self,
        saga_id: UUID,
        name: str,
        context: Mapping[str, Any],
        *,
        fingerprint: str | None,
        lease_seconds: float,
        deadline_seconds: float | None = None,
    ) -> tuple[SagaState, bool]:
        storage = self._storage
        if deadline_seconds is not None:
            deadline_seconds = settings.seconds("deadline_seconds", deadline_seconds)
        if saga_id.int in storage._rows:
            return await self.claim(saga_id, lease_seconds=lease_seconds, name=name), False
        now = storage.clock()
        row = storage._insert(saga_id, name, context, now)
        row.status = SagaStatus.RUNNING
        row.lease_owner = self.owner
        row.lease_expires_at = now + lease_seconds
        row.fingerprint = fingerprint
        if deadline_seconds is not None:
            row.deadline_at = now + deadline_seconds
        # As the SQL storage does: the state of a new saga is not read back (no timestamps).
        state = SagaState(saga_id, name, SagaStatus.RUNNING, context, 1, 0,
                          lease_owner=self.owner, fingerprint=fingerprint)
        self._took_lease(state, lease_seconds)
        return state, True

    async def claim(
        self,
        saga_id: UUID,
        *,
        lease_seconds: float,
        count_attempt: bool = True,
        allow_parked: bool = False,
        name: str | None = None,
    ) -> SagaState:
        state = self._storage._claim(
            self, saga_id, lease_seconds, count_attempt, allow_parked, name
        )
        self._took_lease(state, lease_seconds)
        return state

    async def renew_lease(self, lease_seconds: float) -> None:
        if self.saga_id is None or not self.holds_lease:
            return
        row = self._storage._row(self.saga_id)
        if row.lease_owner != self.owner or not _same_version(row, self.version):
            # Keep ``holds_lease``: it is what fences this run's commits (BufferedRun.commit), and
            # a run whose lease was taken over must write nothing more.
            raise SagaLeaseLostError(
                f"saga {row.saga_id}: lease taken over by {row.lease_owner!r}",
                saga_id=row.saga_id,
                saga_name=row.name,
            )
        row.lease_expires_at = self._storage.clock() + lease_seconds

    async def release(self) -> None:
        if self.saga_id is None or not self.holds_lease:
            return
        self.holds_lease = False
        row = self._storage._rows.get(self.saga_id.int)
        if (row is not None and row.lease_owner == self.owner
                and _same_version(row, self.version)):
            row.lease_owner = row.lease_expires_at = None
            if self.retry_after is not None:
                row.next_attempt_at = self._storage.clock() + self.retry_after
