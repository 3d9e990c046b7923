"""What a storage keeps about a saga: statuses, the step log, and a snapshot of the saga row.

All records are frozen dataclasses; storages build them, the orchestrator only reads them.
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime
from typing import Any
from uuid import UUID

__all__ = [
    "TERMINAL_STATUSES",
    "SagaAction",
    "SagaLogEntry",
    "SagaState",
    "SagaStatus",
    "SagaStepStatus",
]


class SagaStatus(enum.StrEnum):
    """Lifecycle of a saga.

    PENDING: created through the storage protocol but never started; recovery starts it.
    RUNNING: executing steps forward.
    COMPENSATING: a step failed (or the saga was aborted); only compensations run from here on.
    COMPLETED / FAILED: terminal. FAILED means every completed step was compensated.
    PARKED: automatic recovery gave up (attempts exhausted, or the definition no longer fits the
    log). Never retried automatically; resumed or aborted by an explicit call.
    """

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    PARKED = "PARKED"


TERMINAL_STATUSES = frozenset({SagaStatus.COMPLETED, SagaStatus.FAILED})
RECOVERABLE_STATUSES = frozenset({SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.COMPENSATING})


class SagaStepStatus(enum.StrEnum):
    """Status of one step log entry. Act entries end COMPLETED or FAILED; compensate entries end
    COMPENSATED or FAILED. STARTED marks an attempt whose outcome is not recorded."""

    STARTED = "STARTED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    COMPENSATED = "COMPENSATED"


class SagaAction(enum.StrEnum):
    """Which side of a step a log entry is about."""

    ACT = "act"
    COMPENSATE = "compensate"


@dataclasses.dataclass(frozen=True, slots=True)
class SagaLogEntry:
    """One entry of a saga's step history, in the order it was written.

    ``error_type`` and ``details`` describe a failure (or, for fallbacks, why the alternative ran);
    both are None for a plain success.
    """

    saga_id: UUID
    step_name: str
    action: SagaAction
    status: SagaStepStatus
    timestamp: datetime
    details: str | None = None
    error_type: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class SagaState:
    """A snapshot of one stored saga row.

    ``version`` grows by one with every committed write of the saga; a checkpoint names the version
    it expects, which is how a stale writer is fenced out. ``lease_owner``/``lease_expires_at``
    say which run may write the saga and until when.
    """

    saga_id: UUID
    name: str
    status: SagaStatus
    context: dict[str, Any]
    version: int
    recovery_attempts: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    fingerprint: str | None = None
    next_attempt_at: datetime | None = None
    """Recovery backs off: the saga is not listed for recovery before this time."""
