"""A step's act under its retry policy and timeout: attempts, the checkpoint of each failed
attempt, and the waits between them (see docs/forward-recovery.md).

- Each attempt runs with the step's ``timeout`` (if it has one); one that takes longer is
  cancelled and fails with :class:`~sagakit.StepTimeoutError`.
- What follows a failed attempt is decided by :func:`sagakit.plan.after_failure` (pure): give up
  (the caller fails the step: compensation before the pivot, PARKED after it) or retry after a
  wait.
- A failed attempt that will be retried costs one checkpoint: its RETRYING entry (attempt
  number, error) and the time of the next attempt. The live context is put back as the last
  checkpoint left it, so every attempt starts from the same context (and sees the same
  idempotency key).
- A short wait sleeps in this process, lease held. A wait longer than the saga's
  ``durable_wait`` (or any wait while the run is shutting down) is durable: the same checkpoint
  makes the saga WAITING with its lease released, and :class:`Suspended` ends the run; any
  recovery worker continues the saga when the wait is over.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Any

from sagakit.exceptions import SagaLeaseLostError
from sagakit.plan import GiveUp, after_failure

if TYPE_CHECKING:
    from sagakit.execution import Execution
    from sagakit.saga import StepOptions
    from sagakit.step import SagaStepResult

__all__ = ["Suspended", "act_with_retries"]


class Suspended(BaseException):  # a signal through the run, not an error
    """Ends a run at a durable wait (its checkpoint is written): the saga rests WAITING until
    ``seconds`` from now. Never reaches the caller of a saga."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


async def act_with_retries(
    execution: Execution[Any], handler_name: str, options: StepOptions, attempt: int,
) -> SagaStepResult[Any, Any]:
    """Run ``handler_name``'s act from attempt number ``attempt`` on, until an attempt
    succeeds (its result), the policy gives up (the last attempt's error is raised, with
    ``execution.failed_attempt`` set to its number), or a durable wait suspends the run
    (:class:`Suspended`). A lost lease or a failed checkpoint ends it at once."""
    saga = execution.saga
    while True:
        try:
            result = await execution.act_once(handler_name, attempt, options.timeout)
        except SagaLeaseLostError:
            raise
        except Exception as error:
            if error is execution.commit_error:
                raise  # a checkpoint failed: the saga rests at its last one
            decision = after_failure(
                options.retry, attempt, error, now=time.time(),
                deadline_at=execution.deadline_at, past_pivot=execution.past_pivot,
                durable_wait=saga.durable_wait, rng=random.random,
            )
            if isinstance(decision, GiveUp):
                execution.failed_attempt = attempt
                if attempt > 1 or decision.reason:
                    error.add_note(f"sagakit: step {handler_name!r} gave up after attempt "
                                   f"{attempt}: {decision.reason}")
                raise
            durable = decision.durable or execution.should_stop()
            await execution.record_failed_attempt(handler_name, attempt, error,
                                                  decision.seconds, durable=durable)
            if durable:
                raise Suspended(decision.seconds) from None
            await asyncio.sleep(decision.seconds)
            attempt += 1
        else:
            execution.completed_attempt = attempt
            return result
