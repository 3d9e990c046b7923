"""The description of one step invocation, seen by middleware and by the running step."""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any
from uuid import UUID

from sagakit.records import SagaAction

__all__ = ["StepInvocation", "current_invocation"]


@dataclasses.dataclass(slots=True)
class StepInvocation:
    """One call of a step's ``act`` or ``compensate``.

    ``attempt`` counts from 1 (compensations are retried). ``handler`` is the resolved step handler
    instance; ``context`` is the live saga context the step receives. ``fencing_token`` is the
    run's fencing token (see :attr:`fencing_token`). Treat it as read-only: a middleware that
    wants the step to see something else passes ``dataclasses.replace(invocation, ...)`` to
    ``call_next``. (Not a frozen dataclass only because that costs a microsecond per step.)
    """

    saga_id: UUID
    saga_name: str
    step_name: str
    action: SagaAction
    attempt: int
    context: Any
    handler: Any
    fencing_token: int = 0
    """The saga's version when this run took its lease: the same for every invocation of one
    run, larger for every run that takes the saga over later (each takeover writes a new
    version). A downstream service that remembers the highest token it saw for a saga can
    refuse a request with a lower one: it comes from a run that was paused past its lease and
    has been replaced. Compare tokens of one saga only. 0 when the storage's run provides no
    token (a custom run type)."""

    @property
    def idempotency_key(self) -> str:
        """Stable across attempts and crash re-runs: ``"<saga id>:<step>:<action>"``."""
        return f"{self.saga_id}:{self.step_name}:{self.action.value}"


_current: contextvars.ContextVar[StepInvocation | None] = contextvars.ContextVar(
    "sagakit_invocation", default=None
)


def current_invocation() -> StepInvocation | None:
    """The step invocation running in this task, or None."""
    return _current.get()


def set_current(invocation: StepInvocation | None) -> contextvars.Token[StepInvocation | None]:
    return _current.set(invocation)


def reset_current(token: contextvars.Token[StepInvocation | None]) -> None:
    _current.reset(token)
