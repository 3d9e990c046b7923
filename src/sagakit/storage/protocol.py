"""The storage protocol: what a saga storage must do, and the per-saga run the orchestrator uses.

Two ways to write a saga:

- **Commit per call** (``SagaStorage`` methods): every mutating call is its own durable write.
  This is the seed library's protocol; a custom storage implementing only it keeps working, but
  without leases (see below) the orchestrator cannot tell a live run from a crashed one.
- **A run** (``create_run()``): a scoped session for one saga. The seed's operations on a run are
  buffered and none of them writes; ``commit()`` sends the buffered writes of one checkpoint as one
  atomic, fenced write; ``rollback()`` drops them. A run never holds a database connection or
  transaction between calls, so nothing is held while a step runs.

Leases and fencing (the ``LeasedRun`` part of a run): a run that ``start``\\s or ``claim``\\s a saga
owns it until its lease expires; the owner and expiry live on the saga row. Every commit of the
run names the version it expects and its owner, so a run whose lease was taken over writes
nothing more and raises ``SagaLeaseLostError``. Reads through a run see committed data only.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

from sagakit.queue import QueueSettings
from sagakit.records import SagaLogEntry, SagaState, SagaStatus, SagaStepStatus

__all__ = ["ISagaStorage", "LeasedRun", "SagaStorage", "SagaStorageRun"]


@runtime_checkable
class SagaStorageRun(Protocol):
    """A scoped session for one saga; mutations are buffered until :meth:`commit`."""

    async def create_saga(self, saga_id: UUID, name: str, context: Mapping[str, Any]) -> None:
        """Buffer the creation of a PENDING saga at version 1."""

    async def update_context(
        self, saga_id: UUID, context: Mapping[str, Any], current_version: int | None = None
    ) -> None:
        """Buffer a context write. With ``current_version`` the commit fails with
        SagaConcurrencyError unless the stored version is still that one."""

    async def update_status(self, saga_id: UUID, status: SagaStatus) -> None:
        """Buffer a status write."""

    async def log_step(
        self,
        saga_id: UUID,
        step_name: str,
        action: str,
        status: SagaStepStatus,
        details: str | None = None,
        *,
        error_type: str | None = None,
    ) -> None:
        """Buffer a step log entry."""

    async def load_saga_state(
        self, saga_id: UUID, *, read_for_update: bool = False
    ) -> tuple[SagaStatus, dict[str, Any], int]:
        """Committed (status, context, version). Raises SagaNotFoundError."""
        ...

    async def get_step_history(self, saga_id: UUID) -> list[SagaLogEntry]:
        """Committed log entries, in write order."""
        ...

    async def commit(self) -> None:
        """Write everything buffered since the last commit, atomically. No-op when nothing is
        buffered. Raises SagaConcurrencyError (nothing written) when fenced out."""

    async def rollback(self) -> None:
        """Drop everything buffered since the last commit."""


@runtime_checkable
class LeasedRun(SagaStorageRun, Protocol):
    """The lease-aware part of a run that sagakit's orchestrator uses when a storage offers it.

    A run may also have ``fencing_token``, an int: the saga's version when the run took its
    lease (:class:`~sagakit.storage.run.BufferedRun` keeps it for every sagakit storage). Steps
    see it as ``fencing_token``; for a run without it they see 0."""

    owner: str
    retry_after: float | None
    """Set before the run ends: releasing the lease then makes recovery wait this long."""

    async def log_step(
        self,
        saga_id: UUID,
        step_name: str,
        action: str,
        status: SagaStepStatus,
        details: str | None = None,
        *,
        error_type: str | None = None,
        attempt: int | None = None,
    ) -> None:
        """Buffer a step log entry; ``attempt`` is the attempt number of an act entry of a
        step with a retry policy (an integer >= 1, else ValueError; None: not recorded)."""

    async def wait(self, saga_id: UUID, seconds: float, *, release: bool) -> None:
        """Buffer a wait before the saga's next attempt; nothing is written until ``commit()``.

        The commit sets ``next_attempt_at`` to now plus ``seconds`` (the database's clock):
        recovery does not list the saga before then. With ``release`` (a durable wait) it also
        writes status WAITING and releases the lease, as a terminal status does; recovery
        claims the saga once it is due, counting no recovery attempt. Without it (a wait in the
        process) the saga stays RUNNING and leased; ``next_attempt_at`` only keeps recovery
        from resuming it early should this process die meanwhile. ValueError for seconds that
        are not a finite number >= 0. Fenced like any commit: a run that lost its lease writes
        nothing."""

    async def clear_wait(self, saga_id: UUID) -> None:
        """Buffer setting ``next_attempt_at`` back to NULL (the step that waited is done);
        nothing is written until ``commit()``. It drops a wait buffered before it in the same
        checkpoint."""

    async def pivot(self, saga_id: UUID) -> None:
        """Buffer marking the saga past its pivot (``SagaState.past_pivot``); nothing is
        written until ``commit()``. Later checkpoints keep the mark; nothing removes it."""

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
        """Create the saga RUNNING and leased to this run, or, if the id exists, claim it.

        One durable write for a new saga. Returns (state, created). An existing terminal or
        PARKED saga is returned as stored, with nothing written. An existing saga leased by a
        live run raises SagaBusyError, with nothing written. Claiming an existing saga counts a
        recovery attempt (none for a WAITING one).

        ``deadline_seconds``: a new saga's ``deadline_at`` is now plus that many seconds (the
        database's clock); a claimed saga keeps the deadline it was started with. The state
        returned for a new saga is not read back: it carries no timestamps (``deadline_at``
        included); ``get_saga`` and claims return them.
        """
        ...

    async def claim(
        self, saga_id: UUID, *, lease_seconds: float, count_attempt: bool = True,
        allow_parked: bool = False, name: str | None = None,
    ) -> SagaState:
        """Take the lease of an existing saga. Terminal sagas (and PARKED ones unless
        ``allow_parked``) are returned as stored, nothing written. Raises SagaNotFoundError,
        SagaBusyError, or — with ``name`` — SagaDefinitionError when the stored saga has another
        name; nothing is written in each case. A PENDING or WAITING saga becomes RUNNING;
        claiming a WAITING one counts no recovery attempt, even with ``count_attempt``, and
        does not wait for its ``next_attempt_at``."""
        ...

    async def renew_lease(self, lease_seconds: float) -> None:
        """Extend this run's lease; its own durable write. Raises SagaLeaseLostError if another
        run owns the saga now."""

    async def release(self) -> None:
        """Give the lease up (if still held), leaving the saga as last committed."""

    async def reset_recovery_attempts(self, saga_id: UUID) -> None:
        """Buffer setting the recovery attempt count back to 0 (an explicit resume)."""

    def adopt(self, state: SagaState, lease_seconds: float, *,
              sent: float | None = None) -> None:
        """Carry on under a lease taken by ``claim_due`` or ``claim_queued`` for this process,
        counting the lease from ``sent`` (``time.monotonic()`` when the claim was sent)."""


@runtime_checkable
class SagaStorage(Protocol):
    """Where sagas are persisted. Every mutating method here commits on its own."""

    async def create_saga(self, saga_id: UUID, name: str, context: Mapping[str, Any]) -> None:
        """Create a PENDING saga at version 1. Raises SagaConcurrencyError if the id exists."""

    async def update_context(
        self, saga_id: UUID, context: Mapping[str, Any], current_version: int | None = None
    ) -> None:
        """Replace the context; with ``current_version``, only if the stored version matches
        (else SagaConcurrencyError, nothing written)."""

    async def update_status(self, saga_id: UUID, status: SagaStatus) -> None:
        """Set the status."""

    async def log_step(
        self,
        saga_id: UUID,
        step_name: str,
        action: str,
        status: SagaStepStatus,
        details: str | None = None,
        *,
        error_type: str | None = None,
    ) -> None:
        """Append a step log entry. (The seed's signature: sagakit's own storages also take
        ``attempt=``; the orchestrator writes it into ``details`` for a storage without runs.)"""

    async def load_saga_state(
        self, saga_id: UUID, *, read_for_update: bool = False
    ) -> tuple[SagaStatus, dict[str, Any], int]:
        """(status, context, version). Raises SagaNotFoundError."""
        ...

    async def get_saga(self, saga_id: UUID) -> SagaState:
        """The whole saga row. Raises SagaNotFoundError. Not in the seed's protocol: a storage
        without it (or inheriting this stub, which raises NotImplementedError) is still run
        and recovered, but the orchestrator then cannot check a stored saga's name."""
        raise NotImplementedError

    async def get_step_history(self, saga_id: UUID) -> list[SagaLogEntry]:
        """Log entries in write order (empty for an unknown id)."""
        ...

    async def get_sagas_for_recovery(
        self,
        limit: int,
        max_recovery_attempts: int = 5,
        stale_after_seconds: float | None = None,
        saga_name: str | None = None,
    ) -> list[UUID]:
        """Ids of PENDING, RUNNING, COMPENSATING or WAITING sagas not submitted to a queue
        (``SagaState.queue`` None; see ``claim_queued``) whose lease is free or
        expired, whose ``next_attempt_at`` (if set) has passed, and which have had at most
        ``max_recovery_attempts`` recovery attempts (the next claim of one that has had exactly
        that many parks it), least recently updated first. With ``stale_after_seconds``, only
        sagas not updated for that long."""
        ...

    async def list_sagas(
        self,
        *,
        statuses: frozenset[SagaStatus] | None = None,
        saga_name: str | None = None,
        limit: int = 100,
    ) -> list[SagaState]:
        """Sagas newest first, optionally filtered by status and name."""
        ...

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
        """Claim, in one atomic step, up to ``limit`` sagas that ``get_sagas_for_recovery``
        would list (optionally only those named in ``saga_names``): each is leased to
        ``owner``, counts one recovery attempt (a WAITING saga counts none: its wait was not an
        interruption), and PENDING or WAITING becomes RUNNING. Sagas another
        worker claims at the same moment go to one of them, never to both (``SKIP LOCKED`` where
        the database does that well). Optional: a worker falls back to listing and claiming one
        by one when it is missing or raises NotImplementedError (as this stub does)."""
        raise NotImplementedError

    # -- submitted sagas and queues (optional: NotImplementedError where a storage has none) --

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
        """Create the saga PENDING in ``queue``, unleased, in one commit, for a worker to claim
        (``deadline_at`` = now + ``deadline_seconds`` when given). False, with nothing written,
        when the id exists. Sagas submitted here are never listed by
        ``get_sagas_for_recovery`` or claimed by ``claim_due``: only ``claim_queued`` of their
        queue takes them, within the queue's limits."""
        raise NotImplementedError

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
        """Claim, in one atomic step, up to ``limit`` of ``queue``'s due sagas (PENDING,
        interrupted RUNNING or COMPENSATING, due WAITING; lease free or expired;
        ``next_attempt_at`` passed; at most ``max_recovery_attempts`` recovery attempts),
        highest priority first, then oldest first, within the queue's limits (see
        :class:`sagakit.queue.QueueSettings`): running = RUNNING or COMPENSATING under a live
        lease. Each claimed saga is leased to ``owner`` and becomes RUNNING; a PENDING or
        WAITING one counts no recovery attempt, an interrupted one counts one. Workers claiming
        at the same moment never exceed a limit together and never get the same saga."""
        raise NotImplementedError

    async def set_queue(self, settings: QueueSettings) -> None:
        """Create or replace a queue's limits (they apply to the next claim)."""
        raise NotImplementedError

    async def get_queues(self) -> list[QueueSettings]:
        """Every configured queue, by name."""
        raise NotImplementedError

    async def delete_queue(self, name: str) -> bool:
        """Forget a queue's limits (its sagas stay; the queue is then unlimited). False if it
        had none."""
        raise NotImplementedError

    async def queue_counts(self) -> dict[str, dict[SagaStatus, int]]:
        """Per queue holding sagas: how many are in each status (RUNNING counts those under
        a live lease and interrupted ones alike)."""
        raise NotImplementedError

    async def increment_recovery_attempts(
        self, saga_id: UUID, new_status: SagaStatus | None = None
    ) -> None:
        """Add one recovery attempt (and optionally set the status)."""

    async def set_recovery_attempts(self, saga_id: UUID, attempts: int) -> None:
        """Set the recovery attempt count."""

    def create_run(self) -> AbstractAsyncContextManager[SagaStorageRun]:
        """A run for one saga. May raise NotImplementedError (as this stub does, for a storage
        that subclasses the protocol and leaves it out) or be missing: the orchestrator then
        falls back to committing per call."""
        raise NotImplementedError


ISagaStorage = SagaStorage
"""The seed library's name for :class:`SagaStorage`."""
