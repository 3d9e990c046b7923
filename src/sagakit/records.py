"""What a storage keeps about a saga: statuses, the step log, and a snapshot of the saga row.

All records are frozen dataclasses; storages build them, the orchestrator only reads them.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson

__all__ = [
    "TERMINAL_STATUSES",
    "ContextJSON",
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
    WAITING: a step failed and its next attempt is due at ``next_attempt_at`` (a durable wait).
    No run holds it (its lease was released). Not terminal: recovery lists it once
    ``next_attempt_at`` has passed, and claiming it counts no recovery attempt (a wait is not
    an interruption) and makes it RUNNING.
    """

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    PARKED = "PARKED"
    WAITING = "WAITING"


TERMINAL_STATUSES = frozenset({SagaStatus.COMPLETED, SagaStatus.FAILED})
RECOVERABLE_STATUSES = frozenset({
    SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.COMPENSATING, SagaStatus.WAITING,
})
"""The statuses recovery lists (once a saga's lease is free and its ``next_attempt_at`` passed)."""


class SagaStepStatus(enum.StrEnum):
    """Status of one step log entry. Act entries end COMPLETED or FAILED; compensate entries end
    COMPENSATED or FAILED. STARTED marks an attempt whose outcome is not recorded. RETRYING is
    an act entry for a failed attempt that will be retried (its ``details`` and
    ``error_type`` say why it failed); the last failure of a step is FAILED, as without
    retries."""

    STARTED = "STARTED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    COMPENSATED = "COMPENSATED"
    RETRYING = "RETRYING"


class SagaAction(enum.StrEnum):
    """Which side of a step a log entry is about."""

    ACT = "act"
    COMPENSATE = "compensate"


@dataclasses.dataclass(frozen=True, slots=True)
class SagaLogEntry:
    """One entry of a saga's step history, in the order it was written.

    ``error_type`` and ``details`` describe a failure (or, for fallbacks, why the alternative ran);
    both are None for a plain success. ``attempt`` is the attempt number of an act entry of a
    step with a retry policy (None: the first attempt of a step without one, or an entry
    written before attempts were recorded).
    """

    saga_id: UUID
    step_name: str
    action: SagaAction
    status: SagaStepStatus
    timestamp: datetime
    details: str | None = None
    error_type: str | None = None
    attempt: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class SagaState:
    """A snapshot of one stored saga row.

    ``version`` grows by one with every committed write of the saga; a checkpoint names the version
    it expects, which is how a stale writer is fenced out. ``lease_owner``/``lease_expires_at``
    say which run may write the saga and until when. ``context`` is the stored context, read-only
    (a dict when read back from a storage).
    """

    saga_id: UUID
    name: str
    status: SagaStatus
    context: Mapping[str, Any]
    version: int
    recovery_attempts: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    fingerprint: str | None = None
    next_attempt_at: datetime | None = None
    """Recovery backs off: the saga is not listed for recovery before this time. A WAITING
    saga's next attempt is due then."""
    past_pivot: bool = False
    """The saga's pivot step completed: from here on it only goes forward."""
    deadline_at: datetime | None = None
    """When the saga's deadline passes (set when it was started with one)."""
    queue: str | None = None
    """The queue a submitted saga was handed to (None: started in a process of its own)."""
    concurrency_key: str | None = None
    """A submitted saga's concurrency key (see :class:`sagakit.queue.QueueSettings`)."""
    priority: int = 0
    """A submitted saga's priority within its queue: higher is claimed first."""


class ContextJSON(Mapping[str, Any]):
    """A saga context in its stored form, as the engine hands it to a storage: ``json`` is the
    validated JSON text (UTF-8 bytes), so a storage writes it as is instead of encoding the
    context again. It is also a read-only mapping of the decoded data (decoded on first use),
    for storages that want a dict: ``dict(context)`` or :meth:`to_dict`.
    """

    __slots__ = ("_data", "json")

    def __init__(self, json: bytes) -> None:
        self.json = json
        self._data: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A fresh dict of the data (the caller may change it)."""
        return orjson.loads(self.json)  # type: ignore[no-any-return]

    def _decoded(self) -> dict[str, Any]:
        data = self._data
        if data is None:
            data = self._data = self.to_dict()
        return data

    def __getitem__(self, key: str) -> Any:
        return self._decoded()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ContextJSON):
            return self.json == other.json or self._decoded() == other._decoded()
        return isinstance(other, Mapping) and self._decoded() == dict(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ContextJSON({self.json!r})"


def context_json(context: Mapping[str, Any]) -> bytes:
    """The JSON text of a context mapping: ``ContextJSON`` as is, anything else encoded (raises
    TypeError when it is not JSON-serialisable)."""
    if type(context) is ContextJSON:
        return context.json
    return orjson.dumps(context if isinstance(context, dict) else dict(context))
