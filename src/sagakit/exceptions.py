"""Every error sagakit raises on purpose derives from :class:`SagaError`.

The tree::

    SagaError
    ├── SagaDefinitionError      (also a TypeError) a Saga class or its steps are malformed
    ├── SagaSerializationError   (also a TypeError) a context cannot be written or read as JSON
    ├── SagaNotFoundError        (also a LookupError) no saga with that id is stored
    ├── SagaBusyError            another live run holds the saga's lease
    ├── SagaParkedError          the saga is parked; only an explicit resume or abort touches it
    ├── SagaPastPivotError       the saga is past its pivot step: it only goes forward, so
    │                            abort_saga refuses it (nothing written)
    ├── StepTimeoutError         (also a TimeoutError) an attempt of a step's act or compensate
    │                            took longer than its timeout; retried like any error
    ├── SagaStorageError         the storage failed (``__cause__`` is the driver's error); a
    │   │                        checkpoint that failed so was not written: the saga stays at
    │   │                        its last checkpoint, recoverable
    │   ├── SagaStorageUnavailableError  no connection: the server is down or restarting, a
    │   │                        connection was lost, or no pooled connection came free in time;
    │   │                        trying again later may succeed
    │   └── SagaStorageRejectedError     the database refused the data of a write (a value it
    │                            cannot store); writing the same data again fails again
    └── SagaConcurrencyError     a checkpoint's expected version did not match: someone else wrote
        └── SagaLeaseLostError   this run's lease was taken over; it stopped writing

Errors carry ``saga_id`` (None when no saga is involved yet, e.g. a definition error) and
``step_name`` (None when no single step is involved), so logs and callers can tell which saga and
which step failed without parsing messages.

Errors raised by step handlers themselves are never wrapped: the caller of a saga that failed
receives the step's own exception after compensation.
"""

from __future__ import annotations

from typing import Any, Self
from uuid import UUID

__all__ = [
    "SagaBusyError",
    "SagaConcurrencyError",
    "SagaDefinitionError",
    "SagaError",
    "SagaLeaseLostError",
    "SagaNotFoundError",
    "SagaParkedError",
    "SagaPastPivotError",
    "SagaSerializationError",
    "SagaStorageError",
    "SagaStorageRejectedError",
    "SagaStorageUnavailableError",
    "StepTimeoutError",
]


class SagaError(Exception):
    """Root of sagakit's errors."""

    def __init__(
        self,
        message: str,
        *,
        saga_id: UUID | None = None,
        step_name: str | None = None,
        saga_name: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.saga_id = saga_id
        self.step_name = step_name
        self.saga_name = saga_name

    def locate(
        self,
        *,
        saga_id: UUID | None = None,
        saga_name: str | None = None,
        step_name: str | None = None,
    ) -> Self:
        """Fill in whichever of ``saga_id``, ``saga_name`` and ``step_name`` the error lacks
        (a storage knows the saga's id; the engine, its name and the step at hand); return it."""
        if self.saga_id is None:
            self.saga_id = saga_id
        if self.saga_name is None:
            self.saga_name = saga_name
        if self.step_name is None:
            self.step_name = step_name
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the keyword attributes when an error crosses a process boundary.
        return (_rebuild, (type(self), self.message, self.saga_id, self.step_name, self.saga_name))


def _rebuild(
    cls: type[SagaError],
    message: str,
    saga_id: UUID | None,
    step_name: str | None,
    saga_name: str | None,
) -> SagaError:
    return cls(message, saga_id=saga_id, step_name=step_name, saga_name=saga_name)


class SagaDefinitionError(SagaError, TypeError):
    """A saga definition is invalid: a non-handler step, a duplicate, a context type mismatch,
    or a stored saga whose log no longer fits the current definition."""


class SagaSerializationError(SagaError, TypeError):
    """A context cannot be serialised to JSON (or deserialised back); the message names the field."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        saga_id: UUID | None = None,
        step_name: str | None = None,
        saga_name: str | None = None,
    ) -> None:
        super().__init__(message, saga_id=saga_id, step_name=step_name, saga_name=saga_name)
        self.field = field


class SagaNotFoundError(SagaError, LookupError):
    """No saga with this id is stored."""


class SagaBusyError(SagaError):
    """Another live run holds this saga's lease; nothing was written."""


class SagaParkedError(SagaError):
    """The saga is PARKED: automatic recovery gave up on it; resume or abort it explicitly."""


class SagaPastPivotError(SagaError):
    """The saga's pivot step completed: from there on it only goes forward, so it cannot be
    aborted (compensated). Raised by :func:`sagakit.abort_saga` and ``sagakit abort``; nothing
    was written. A saga parked past its pivot is finished by :func:`sagakit.resume_saga`."""


class StepTimeoutError(SagaError, TimeoutError):
    """An attempt of a step's ``act`` took longer than the step's ``timeout`` (or its
    ``compensate`` longer than ``compensate_timeout``): the attempt was cancelled. Like any
    error of the step, it is retried by the step's retry policy (``TimeoutError`` is an
    ``Exception``); ``timeout`` is the limit in seconds, ``action`` ``"act"`` or
    ``"compensate"``."""

    def __init__(
        self,
        message: str,
        *,
        timeout: float | None = None,
        action: str = "act",
        saga_id: UUID | None = None,
        step_name: str | None = None,
        saga_name: str | None = None,
    ) -> None:
        super().__init__(message, saga_id=saga_id, step_name=step_name, saga_name=saga_name)
        self.timeout = timeout
        self.action = action

    @classmethod
    def expired(
        cls,
        timeout: float,
        *,
        action: str = "act",
        saga_id: UUID | None = None,
        step_name: str | None = None,
        saga_name: str | None = None,
    ) -> StepTimeoutError:
        """The error for an attempt cut off after ``timeout`` seconds, its message naming the
        saga, the step and the timeout."""
        option = "timeout" if action == "act" else "compensate_timeout"
        return cls(
            f"saga {saga_name!r} ({saga_id}): {action} of step {step_name!r} took longer than "
            f"its {option} of {timeout:g} s",
            timeout=timeout, action=action, saga_id=saga_id, step_name=step_name,
            saga_name=saga_name,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_timeout, (self.message, self.timeout, self.action, self.saga_id,
                                   self.step_name, self.saga_name))


def _rebuild_timeout(message: str, timeout: float | None, action: str, saga_id: UUID | None,
                     step_name: str | None, saga_name: str | None) -> StepTimeoutError:
    return StepTimeoutError(message, timeout=timeout, action=action, saga_id=saga_id,
                            step_name=step_name, saga_name=saga_name)


class SagaStorageError(SagaError):
    """The storage failed; ``__cause__`` is the driver's error. A checkpoint that failed so is
    not durable, and the saga can be recovered from the last one."""


class SagaStorageUnavailableError(SagaStorageError):
    """The database could not be reached: the server is down or restarting, the connection was
    lost, or no pooled connection came free within the storage's wait. Transient: the same call
    may succeed later. (A write cut off by a lost connection may or may not have been
    committed; fenced writes make that safe to retry.)"""


class SagaStorageRejectedError(SagaStorageError):
    """The database refused the data of a write (a value out of range, too long, or of a kind
    it cannot store). Not transient: the same write fails again, so the engine treats a
    checkpoint refused this way as the failure of the step that produced it."""


class SagaConcurrencyError(SagaError):
    """A write expected a version of the saga that is no longer current; nothing of it was written."""


class SagaLeaseLostError(SagaConcurrencyError):
    """This run's lease was taken over by another run, or may have run out (no renewal got
    through in time: the process was paused, or cut off from the database). The run stopped:
    it wrote nothing more, and a step it had in flight was cancelled."""
