"""What happens next for a saga, given its stored status and step log. Pure code: no I/O.

The rules (Strict Backward Recovery):

- COMPLETED and FAILED are terminal: nothing runs, nothing is written.
- PENDING and RUNNING go forward from the first step whose act is not recorded COMPLETED;
  steps recorded COMPLETED never run again. A RUNNING saga whose log already records a failed
  act goes backward (the status write was cut off after the failure was logged).
- COMPENSATING goes backward, forever: every step whose act COMPLETED and whose compensation is
  not recorded COMPENSATED is compensated, in reverse order of completion. Steps already
  compensated are skipped.
- PARKED does nothing unless resumed explicitly; a resumed saga goes backward if its log shows a
  failure or any compensation, forward otherwise.
- A log that does not fit the current definition (a logged step no longer exists, or the
  completed steps are not a prefix of the step list) is a mismatch: the saga must be parked
  untouched rather than guessed at.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from sagakit.records import SagaAction, SagaLogEntry, SagaStatus, SagaStepStatus
from sagakit.saga import StepSpec

ABORTED = "SagaAborted"
"""The error type an explicit abort records as the failed act of the saga's next step."""

__all__ = ["Backward", "CompletedStep", "Finished", "Forward", "Mismatch", "Plan", "decide"]


@dataclasses.dataclass(frozen=True, slots=True)
class CompletedStep:
    """A step whose act is recorded COMPLETED: its position and the handler that completed it."""

    index: int
    handler_name: str


@dataclasses.dataclass(frozen=True, slots=True)
class Finished:
    """Terminal already: nothing to run, nothing to write."""

    status: SagaStatus


@dataclasses.dataclass(frozen=True, slots=True)
class Forward:
    """Run steps from ``start`` on (``start == len(steps)`` means: only mark COMPLETED)."""

    start: int
    completed: tuple[CompletedStep, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Backward:
    """Compensate these steps, in this order (empty means: only mark FAILED)."""

    to_compensate: tuple[CompletedStep, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Mismatch:
    """The log does not fit the definition; park the saga and touch nothing."""

    reason: str


Plan = Finished | Forward | Backward | Mismatch


def decide(
    status: SagaStatus,
    specs: Sequence[StepSpec],
    history: Sequence[SagaLogEntry],
    *,
    resume_parked: bool = False,
) -> Plan:
    """The next thing to do for a saga. See the module docstring for the rules."""
    if status in (SagaStatus.COMPLETED, SagaStatus.FAILED):
        return Finished(status)
    if status is SagaStatus.PARKED and not resume_parked:
        return Finished(status)

    owner = _handler_positions(specs)
    completed: list[CompletedStep] = []
    compensated: set[str] = set()
    failed_step = False
    any_compensation = False
    for entry in history:
        index = owner.get(entry.step_name)
        if index is None:
            return Mismatch(f"the log names step {entry.step_name!r}, which the saga no longer has")
        if entry.action is SagaAction.ACT:
            if entry.status is SagaStepStatus.COMPLETED:
                completed = [c for c in completed if c.index != index]
                completed.append(CompletedStep(index, entry.step_name))
            elif entry.status is SagaStepStatus.FAILED and _fails_step(specs[index], entry):
                failed_step = True
        else:
            any_compensation = True
            if entry.status is SagaStepStatus.COMPENSATED:
                compensated.add(entry.step_name)

    backward = status is SagaStatus.COMPENSATING or failed_step
    if status is SagaStatus.PARKED:
        backward = failed_step or any_compensation
    if backward:
        todo = [c for c in reversed(completed) if c.handler_name not in compensated]
        return Backward(tuple(todo))

    done = sorted(c.index for c in completed)
    if done != list(range(len(done))):
        names = [specs[i].name for i in done]
        return Mismatch(f"completed steps {names} are not the first steps of the saga")
    return Forward(len(done), tuple(sorted(completed, key=lambda c: c.index)))


def _handler_positions(specs: Sequence[StepSpec]) -> dict[str, int]:
    positions: dict[str, int] = {}
    for index, spec in enumerate(specs):
        for name in spec.handler_names():
            positions[name] = index
    return positions


def _fails_step(spec: StepSpec, entry: SagaLogEntry) -> bool:
    """A failed act of a fallback's primary does not fail the step: the alternative takes over
    (but an explicit abort recorded against the primary does)."""
    return spec.fallback is None or entry.step_name != spec.name or entry.error_type == ABORTED
