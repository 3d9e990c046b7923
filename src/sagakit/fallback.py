"""Fallback steps: a primary step with an alternative that runs when the primary cannot.

``Fallback(step=Primary, fallback=Alternative, failure_exceptions=(...), circuit_breaker=...)``
stands in a saga's ``steps`` beside plain steps. Running it:

1. With a breaker, ``check(Primary name)`` first: an open circuit skips the primary.
2. Otherwise ``Primary.act`` runs. Success: the step is done, as a plain step. An error listed
   in ``failure_exceptions`` (any ``Exception`` when none are listed) hands over to the
   alternative; any other error fails the step as usual (the saga compensates; the alternative
   never runs). The breaker learns the outcome of every call (its ``exclude`` decides what
   counts). Cancellations, crashes and a lost lease (``SagaLeaseLostError``) pass
   straight through.
3. Handing over: the live context is restored in place to the context as it was before the
   primary started, the primary's act is logged FAILED with the reason (its error, or
   ``sagakit.CircuitOpenError`` for an open circuit) and that entry is committed as its own
   checkpoint; then ``Alternative.act`` runs under its own name. Its failure fails the step.

The hand-over is durable before the alternative runs (one commit more, on the fallback path
only), so after a crash the log tells what may have run:

- no entry for the step: only the primary may have run, and its outcome is unknown. Recovery
  runs the primary again (its idempotency key dedups). Should the step hand over now, the
  primary's earlier attempt may have had its effect: the hand-over is recorded together with a
  ``compensate``/STARTED entry of the primary, the primary is compensated (retried like any
  compensation; logged COMPENSATED with the step's checkpoint), and only then does the
  alternative run. A compensation that fails for good fails the step (logged FAILED; the
  alternative never runs): the saga compensates the earlier steps and stays COMPENSATING, and
  recovery retries the primary's compensation first.
- the hand-over recorded and no completion: the primary failed, the alternative may have run.
  Recovery runs the alternative directly (its idempotency key dedups), after the primary's
  compensation if that is recorded STARTED and not yet COMPENSATED.

Only a run that resumes a stored saga, and only at the step it resumes at, has such an earlier
attempt (see :class:`sagakit.plan.Attempt`); a first run never compensates a primary.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from sagakit.breaker import CIRCUIT_OPEN_ERROR_TYPE, CircuitBreakerProtocol, CircuitOpenError
from sagakit.breaker import exception_types as _exception_types
from sagakit.exceptions import SagaDefinitionError, SagaLeaseLostError
from sagakit.execution import describe_error
from sagakit.records import SagaAction, SagaStepStatus
from sagakit.saga import StepSpec
from sagakit.step import SagaStepHandler, SagaStepResult

if TYPE_CHECKING:
    from sagakit.execution import Execution
    from sagakit.plan import Attempt

__all__ = ["Fallback"]

logger = logging.getLogger("sagakit")


@dataclasses.dataclass(frozen=True)
class Fallback:
    """A saga step with an alternative. See the module documentation for the rules.

    ``step`` and ``fallback`` are step handler classes (their names must be unique in the saga,
    as for any step). ``failure_exceptions``: the errors of the primary that hand over to the
    fallback (empty: any ``Exception``). ``circuit_breaker``: optional; a breaker object (e.g.
    :class:`sagakit.CircuitBreaker`, :class:`sagakit.RedisCircuitBreaker`) guarding the
    primary, keyed by the primary's name.
    """

    step: type[SagaStepHandler[Any, Any]]
    fallback: type[SagaStepHandler[Any, Any]]
    failure_exceptions: tuple[type[Exception], ...] = ()
    circuit_breaker: CircuitBreakerProtocol | None = None

    def __post_init__(self) -> None:
        for role, handler in (("step", self.step), ("fallback", self.fallback)):
            if not (isinstance(handler, type) and issubclass(handler, SagaStepHandler)):
                raise SagaDefinitionError(
                    f"Fallback {role} must be a SagaStepHandler subclass, got {handler!r}"
                )
        if self.step is self.fallback:
            raise SagaDefinitionError(
                f"Fallback step and fallback are the same class {self.step.__name__!r}",
                step_name=self.step.__name__,
            )
        errors = _exception_types(self.failure_exceptions, "Fallback failure_exceptions")
        object.__setattr__(self, "failure_exceptions", errors)
        breaker = self.circuit_breaker
        if breaker is not None and not isinstance(breaker, CircuitBreakerProtocol):
            raise SagaDefinitionError(
                f"Fallback circuit_breaker {breaker!r} has no async check(name), "
                "record_success(name) and record_failure(name, error)"
            )

    def __repr__(self) -> str:
        return f"Fallback({self.step.__name__} -> {self.fallback.__name__})"

    def to_step_spec(self) -> StepSpec:
        """The engine's view of this entry of ``Saga.steps``."""
        return StepSpec(self.step, fallback=self)

    def hands_over(self, error: BaseException) -> bool:
        """Whether this error of the primary makes the fallback run."""
        if not isinstance(error, Exception):
            return False
        return not self.failure_exceptions or isinstance(error, self.failure_exceptions)

    async def run(
        self, execution: Execution[Any], spec: StepSpec, attempt: Attempt | None = None
    ) -> tuple[SagaStepResult[Any, Any], str]:
        """Run the step (called by the engine); return (result, name of the handler that
        completed it). ``attempt``: what the log says of an earlier attempt, when a resumed run
        starts at this step. Raises the error that failed the step."""
        primary = spec.name
        execution.blame(primary)  # a breaker's own error fails the primary's step
        if attempt is not None and attempt.handed_over is not None:
            error_type = attempt.handed_over.error_type or ""
            details = attempt.handed_over.details or ""
            logger.info("saga %s %s: step %s was handed over before this run; running "
                        "fallback %s", execution.saga.name, execution.saga_id, primary,
                        self.fallback.__name__)
        else:
            outcome = await self._try_primary(execution, primary)
            if not isinstance(outcome, Exception):
                return outcome, primary
            error_type, details = await self._hand_over(
                execution, primary, outcome, undo=attempt is not None
            )
        if attempt is not None and attempt.undo_primary:
            await execution.undo_attempt(primary)
        name = self.fallback.__name__
        result = await execution.call_act(name)
        return dataclasses.replace(result, error_type=error_type, error_message=details), name

    async def _try_primary(
        self, execution: Execution[Any], primary: str
    ) -> SagaStepResult[Any, Any] | Exception:
        """The primary's result, or the reason to hand over (the live context then restored).
        Raises an error of the primary that does not hand over."""
        breaker = self.circuit_breaker
        try:
            if breaker is not None:
                await breaker.check(primary)
        except CircuitOpenError as exc:
            return exc
        try:
            result = await execution.call_act(primary)
        except SagaLeaseLostError:
            raise  # the run lost the saga: no verdict on the primary, no hand-over
        except Exception as exc:
            if breaker is not None:
                await _record(breaker.record_failure(primary, exc), primary)
            if not self.hands_over(exc):
                raise
            execution.codec.restore(execution.context, execution.checkpointed_context)
            return exc
        if breaker is not None:
            await _record(breaker.record_success(primary), primary)
        return result

    async def _hand_over(
        self, execution: Execution[Any], primary: str, reason: Exception, *, undo: bool
    ) -> tuple[str, str]:
        """Record the hand-over as its own checkpoint; return (error_type, details) of the
        reason. ``undo``: the primary's earlier attempt is to be compensated first, which is
        recorded too (before the FAILED entry: a storage writing entries one by one and cut off
        between them leaves no hand-over, and the primary may still run again)."""
        error_type, details = describe_error(reason)
        if isinstance(reason, CircuitOpenError):
            error_type = CIRCUIT_OPEN_ERROR_TYPE
        name = self.fallback.__name__
        # An open circuit is routine while it lasts; a primary's own failure is worth a warning.
        level = logging.INFO if isinstance(reason, CircuitOpenError) else logging.WARNING
        logger.log(level, "saga %s %s: step %s did not complete (%s); %srunning fallback %s",
                   execution.saga.name, execution.saga_id, primary, details,
                   "compensating its earlier attempt (cut off) first, then " if undo else "",
                   name)
        run, saga_id = execution.run, execution.saga_id
        if undo:
            await run.log_step(
                saga_id, primary, SagaAction.COMPENSATE, SagaStepStatus.STARTED,
                f"resumed: an earlier attempt, cut off, may have had its effect; compensated "
                f"before {name} runs",
            )
        await run.log_step(
            saga_id, primary, SagaAction.ACT, SagaStepStatus.FAILED, details,
            error_type=error_type,
        )
        await execution.commit()
        return error_type, details


async def _record(call: Any, name: str) -> None:
    try:
        await call
    except Exception:  # bookkeeping must not decide the step's outcome
        logger.warning("circuit breaker could not record the outcome of %s", name, exc_info=True)
