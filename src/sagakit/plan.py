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
  failure or any compensation of a completed step, forward otherwise.
- WAITING (a durable wait between two attempts of a step) goes on as RUNNING does.
- A log that does not fit the current definition is a mismatch: the saga must be parked
  untouched rather than guessed at. It does not fit when a logged step no longer exists, when
  the acts logged COMPLETED are not in the order of the step list (steps were reordered: in
  either direction), or, going forward, when the completed steps are not the first steps.

Forward recovery (see docs/forward-recovery.md):

- A RETRYING act entry is a failed attempt that was to be retried: it never fails the step nor
  sends the saga backward. :attr:`Forward.attempts` counts those of the handler that runs next
  since its last FAILED act entry, so recovery continues the count, and a step resumed after
  its retries ran out (FAILED, PARKED) gets a fresh budget.
- Once the pivot step's act is logged COMPLETED the saga is past its pivot
  (:attr:`Forward.past_pivot`) and never goes backward: a FAILED act after the pivot is a step
  parked when its retries ran out; resumed, it goes forward at that step. A saga past its
  pivot whose status is COMPENSATING, or whose log compensates a completed step, does not fit
  (the definition's pivot moved while it ran): a mismatch.
- :func:`after_failure` decides what follows a failed attempt: retry after a wait (in this
  process or durable) or give up.

Fallback steps (see :mod:`sagakit.fallback`): a primary's act logged FAILED is the hand-over to
its alternative and does not fail the step (an explicit abort recorded against it does). A
resumed run does not know what its predecessor's attempt at the step it starts at did; for a
fallback step :class:`Attempt` tells what the log says:

- no entry for the step: only the primary may have run. It runs again (its idempotency key
  dedups); should the step hand over now, the primary's earlier attempt is compensated before
  the alternative runs.
- the hand-over recorded, no completion: the alternative may have run, the primary failed. The
  alternative runs again directly, the primary not again.
- the hand-over recorded together with a pending compensation of the primary (its
  ``compensate`` entry STARTED, not yet COMPENSATED): that compensation runs first.

A compensation of a primary whose act never COMPLETED is that undoing of an earlier attempt. It
is not a compensation of a completed step (a parked saga showing one still resumes forward),
but until it is recorded COMPENSATED the primary counts as a step to compensate when the saga
goes backward; recorded FAILED (it failed for good), it fails the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from sagakit.records import SagaAction, SagaLogEntry, SagaStatus, SagaStepStatus
from sagakit.retry import Retry
from sagakit.saga import StepSpec

ABORTED = "SagaAborted"
"""The error type an explicit abort records as the failed act of the saga's next step."""

__all__ = [
    "Attempt", "Backward", "CompletedStep", "Finished", "Forward", "GiveUp", "Mismatch", "Next",
    "Plan", "RetryAfter", "after_failure", "decide",
]


@dataclasses.dataclass(frozen=True, slots=True)
class CompletedStep:
    """A step whose act is recorded COMPLETED: its position and the handler that completed it."""

    index: int
    handler_name: str


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """What the log says of an earlier attempt at the fallback step a resumed run starts at."""

    index: int
    primary: str
    handed_over: SagaLogEntry | None
    """The primary's FAILED entry that handed the step over (None: no entry for the step)."""
    undo_primary: bool
    """The primary's earlier attempt may have had its effect and is not known compensated:
    the primary is compensated before the alternative runs."""

    @property
    def undo_pending(self) -> bool:
        """The hand-over is recorded and the primary's compensation not yet done."""
        return self.handed_over is not None and self.undo_primary


@dataclasses.dataclass(frozen=True, slots=True)
class Finished:
    """Terminal already: nothing to run, nothing to write."""

    status: SagaStatus


@dataclasses.dataclass(frozen=True, slots=True)
class Forward:
    """Run steps from ``start`` on (``start == len(steps)`` means: only mark COMPLETED).
    ``attempt``: set when a stored saga resumes at a fallback step. ``attempts``: the failed
    attempts (RETRYING act entries) of the handler that runs next at ``start`` (a fallback's
    alternative once the hand-over is recorded) since its last FAILED act entry; the next
    attempt is number ``attempts + 1``. ``past_pivot``: the pivot step's act is logged
    COMPLETED (the saga must never compensate)."""

    start: int
    completed: tuple[CompletedStep, ...]
    attempt: Attempt | None = None
    attempts: int = 0
    past_pivot: bool = False

    def to_abort(self) -> tuple[CompletedStep, ...]:
        """What an explicit abort compensates, in order: a primary whose compensation is
        pending, then the completed steps, latest first."""
        done = tuple(reversed(self.completed))
        attempt = self.attempt
        if attempt is not None and attempt.undo_pending:
            return (CompletedStep(attempt.index, attempt.primary), *done)
        return done


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
    effects: dict[str, CompletedStep] = {}  # what may need compensating, in order of effect
    compensated: set[str] = set()
    failed_step = False
    any_compensation = False
    for entry in history:
        name = entry.step_name
        index = owner.get(name)
        if index is None:
            return Mismatch(f"the log names step {name!r}, which the saga no longer has")
        if entry.action is SagaAction.ACT:
            if entry.status is SagaStepStatus.COMPLETED:
                if completed and index < completed[-1].index:
                    return Mismatch(_reordered(completed[-1].handler_name, name))
                step = CompletedStep(index, name)
                completed = [c for c in completed if c.index != index]
                completed.append(step)
                effects.pop(name, None)
                effects[name] = step
            elif entry.status is SagaStepStatus.FAILED and _fails_step(specs[index], entry):
                failed_step = True
        elif any(c.handler_name == name for c in completed):
            any_compensation = True
            if entry.status is SagaStepStatus.COMPENSATED:
                compensated.add(name)
        else:  # a primary's earlier attempt, compensated before its alternative runs
            effects.setdefault(name, CompletedStep(index, name))
            if entry.status is SagaStepStatus.COMPENSATED:
                compensated.add(name)
            elif entry.status is SagaStepStatus.FAILED:
                failed_step = True  # it could not be undone: the step fails

    pivot = next((index for index, spec in enumerate(specs) if spec.pivot), None)
    past_pivot = pivot is not None and any(c.index == pivot for c in completed)
    backward = status is SagaStatus.COMPENSATING or failed_step
    if status is SagaStatus.PARKED:
        backward = failed_step or any_compensation
    if past_pivot:
        if status is SagaStatus.COMPENSATING or any_compensation:
            name = next(spec.name for spec in specs if spec.pivot)
            return Mismatch(f"the log shows the pivot {name!r} completed but the saga "
                            "compensates: its pivot was moved")
        backward = False  # a failed act after the pivot: parked when its retries ran out
    if backward:
        todo = [c for c in reversed(effects.values()) if c.handler_name not in compensated]
        return Backward(tuple(todo))

    done = sorted(c.index for c in completed)
    if done != list(range(len(done))):
        names = [specs[i].name for i in done]
        return Mismatch(f"completed steps {names} are not the first steps of the saga")
    start = len(done)
    attempt = None
    attempts = 0
    if start < len(specs):
        runs_next = specs[start].name
        if specs[start].fallback is not None:
            attempt = _attempt(start, runs_next, history, effects, compensated)
            if attempt.handed_over is not None:
                runs_next = specs[start].handler_names()[1]
        attempts = _failed_attempts(runs_next, history)
    return Forward(start, tuple(completed), attempt, attempts, past_pivot)


def _failed_attempts(handler_name: str, history: Sequence[SagaLogEntry]) -> int:
    """RETRYING act entries of ``handler_name`` since its last FAILED act entry."""
    count = 0
    for entry in history:
        if entry.step_name == handler_name and entry.action is SagaAction.ACT:
            if entry.status is SagaStepStatus.RETRYING:
                count += 1
            elif entry.status is SagaStepStatus.FAILED:
                count = 0
    return count


def _attempt(
    index: int,
    primary: str,
    history: Sequence[SagaLogEntry],
    effects: dict[str, CompletedStep],
    compensated: set[str],
) -> Attempt:
    handed_over = None
    for entry in history:
        if (entry.step_name == primary and entry.action is SagaAction.ACT
                and entry.status is SagaStepStatus.FAILED):
            handed_over = entry
    pending = primary in effects and primary not in compensated
    return Attempt(index, primary, handed_over, handed_over is None or pending)


def _reordered(before: str, name: str) -> str:
    return (f"the log completed step {before!r} before step {name!r}, but the saga now runs "
            f"{name!r} first: its steps were reordered")


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


# -- after a failed attempt ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class RetryAfter:
    """Try the step again after ``seconds``. ``durable``: the wait is longer than the saga's
    ``durable_wait``, so no process should hold the saga meanwhile (WAITING, lease
    released); otherwise the run sleeps, keeping its lease."""

    seconds: float
    durable: bool


@dataclasses.dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop retrying: the attempt's error fails the step (before the pivot: compensation, as
    without retries; after it: the saga is PARKED). ``reason`` says why, for the log and the
    error's note; empty when the step retries nothing (no policy, or a single attempt)."""

    reason: str


Next = RetryAfter | GiveUp


def after_failure(
    retry: Retry | None,
    attempt: int,
    error: BaseException,
    *,
    now: float,
    deadline_at: float | None,
    past_pivot: bool,
    durable_wait: float,
    rng: Callable[[], float],
) -> Next:
    """What follows the failure of attempt number ``attempt`` (1, 2, ...) of a step's act that
    raised ``error``, under the step's ``retry`` policy:

    - no policy, or a single attempt: give up (reason empty);
    - a permanent error, an instance of ``give_up_on``, not an instance of ``retry_on``: give
      up (``give_up_on`` wins over ``retry_on``);
    - ``attempt`` is the last of the budget (or beyond it, after crashes): give up;
    - before the pivot, a deadline (``deadline_at``, seconds on the clock of ``now``) already
      passed or reached by the wait: give up; past the pivot deadlines do not apply;
    - else retry after ``retry.wait_before(attempt + 1, rng)`` seconds (finite, >= 0),
      durable when longer than ``durable_wait``.
    """
    if retry is None or retry.attempts == 1:
        return GiveUp("")
    refusal = retry.refusal(error)
    if refusal is not None:
        return GiveUp(refusal)
    if attempt >= retry.attempts:
        return GiveUp(f"attempts exhausted ({attempt} of {retry.attempts} failed)")
    wait = retry.wait_before(attempt + 1, rng)
    if not past_pivot and deadline_at is not None and now + wait >= deadline_at:
        if now >= deadline_at:
            return GiveUp("the saga's deadline passed")
        return GiveUp(f"the saga's deadline passes before the next attempt (in {wait:g} s)")
    return RetryAfter(wait, wait > durable_wait)
