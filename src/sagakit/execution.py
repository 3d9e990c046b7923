"""Driving one saga through a plan: running steps, compensating, and writing checkpoints.

Used by :class:`~sagakit.transaction.SagaTransaction` (first runs and resumes) and by
:func:`~sagakit.recovery.recover_saga`. The checkpoints:

- the saga row is durable (RUNNING, leased) before the first ``act()`` — written by the run's
  ``start``/``claim``, not here;
- each completed step (its log entry and the context, if it changed) is one checkpoint; the last
  one also writes COMPLETED and releases the lease;
- a failed step's log entry, the context and COMPENSATING are one checkpoint, durable before the
  first ``compensate()`` (FAILED instead when no step had completed: nothing to compensate);
- each compensated step is one checkpoint; the last one also writes FAILED (unless a
  compensation failed for good: the saga then stays COMPENSATING for recovery).

Nothing is written while a step runs; the lease is renewed in the background if a step outlives
a third of it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Generic, TypeVar
from uuid import UUID

from sagakit.attempts import Suspended, act_with_retries
from sagakit.caller import StepCaller
from sagakit.compensator import CompensationFailure, CompensationTask, RetryPolicy, SagaCompensator
from sagakit.container import Container
from sagakit.context import ContextCodec
from sagakit.exceptions import (
    SagaDefinitionError,
    SagaError,
    SagaLeaseLostError,
    SagaSerializationError,
    SagaStorageError,
    SagaStorageRejectedError,
)
from sagakit.invocation import (
    StepInvocation,
)
from sagakit.lease import LeaseKeeper
from sagakit.middleware import Middleware, saga_log_context
from sagakit.plan import (
    Attempt,
    Backward,
    CompletedStep,
    Finished,
    Forward,
    Mismatch,
    Plan,
)
from sagakit.records import (
    ContextJSON,
    SagaAction,
    SagaStatus,
    SagaStepStatus,
)
from sagakit.saga import Saga, StepSpec
from sagakit.step import SagaStepResult, step_result
from sagakit.storage.protocol import LeasedRun

__all__ = ["Execution", "describe_error"]

C = TypeVar("C")
logger = logging.getLogger("sagakit")


def describe_error(exc: BaseException) -> tuple[str, str]:
    """(error_type, details) as recorded in the step log."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return name, f"{kind.__name__}: {exc}"


class Execution(Generic[C]):
    """One run of one saga. ``status`` is the saga's status as last committed by this run."""

    def __init__(
        self,
        *,
        saga: Saga[C],
        saga_id: UUID,
        run: LeasedRun,
        codec: ContextCodec[C],
        context: C,
        stored_context: bytes,
        container: Container,
        middlewares: Sequence[Middleware],
        retry: RetryPolicy,
        lease_seconds: float,
        status: SagaStatus = SagaStatus.RUNNING,
        deadline_at: float | None = None,
        past_pivot: bool = False,
    ) -> None:
        self.saga = saga
        self.saga_id = saga_id
        self.run = run
        self.codec = codec
        self.context = context
        self.container = container
        self.retry = retry
        self.lease_seconds = lease_seconds
        self.status = status
        self.step_error: Exception | None = None
        self.compensation_failures: list[CompensationFailure] = []
        self._stored = stored_context
        self.caller = StepCaller(saga, saga_id, container, middlewares,
                                 getattr(run, "fencing_token", 0))
        self._failed_handler = ""
        self._unstorable = False
        self.commit_error: BaseException | None = None
        """The error of the last checkpoint that failed (to tell it from a step's own error)."""
        self.deadline_at = deadline_at
        """The saga's deadline, seconds since the epoch (None: none)."""
        self.past_pivot = past_pivot
        """The pivot step's checkpoint is durable: the saga only goes forward."""
        self.failed_attempt: int | None = None
        """The number of the attempt whose error failed the step being handled (None: 1)."""
        self._resumed: tuple[str, int] | None = None  # (handler, failed attempts) to resume at
        self.completed_attempt: int | None = None
        """The number of the attempt that completed the step just run (None: a plain step)."""
        self._act_options = self.caller.act_options
        self._attempt: Attempt | None = None
        self.should_stop: Callable[[], bool] = _never
        """Checked after each checkpoint; True makes the run stop there (graceful shutdown)."""

    # -- entry point -----------------------------------------------------------------------------

    def execute(self, plan: Plan) -> AsyncIterator[SagaStepResult[C, Any]]:
        """Carry the plan out, yielding a result after each forward step's checkpoint."""
        if isinstance(plan, Forward):
            return self._forward(plan)  # no wrapping generator: one frame less per step
        return self._not_forward(plan)

    async def _not_forward(self, plan: Plan) -> AsyncIterator[SagaStepResult[C, Any]]:
        if isinstance(plan, Finished):
            self.status = plan.status
            return
        if isinstance(plan, Mismatch):
            await self.park()
            raise SagaDefinitionError(
                f"saga {self.saga.name!r} {self.saga_id}: {plan.reason}; parked untouched",
                saga_id=self.saga_id,
                saga_name=self.saga.name,
            )
        assert isinstance(plan, Backward)
        async with LeaseKeeper(self.run, self.lease_seconds) as self.caller.keeper:
            await self._backward(plan.to_compensate)
        nothing: tuple[SagaStepResult[C, Any], ...] = ()
        for result in nothing:  # an async generator that yields nothing
            yield result

    async def compensate(self, to_compensate: Sequence[CompletedStep]) -> None:
        """Go backward now (an explicit abort); the caller made COMPENSATING durable first."""
        self.status = SagaStatus.COMPENSATING
        async with LeaseKeeper(self.run, self.lease_seconds) as self.caller.keeper:
            await self._backward(to_compensate)

    @property
    def checkpointed_context(self) -> dict[str, Any]:
        """The context's stored form as of the last checkpoint: during a step, the context as
        it was before the step started."""
        return ContextJSON(self._stored).to_dict()

    def blame(self, handler_name: str) -> None:
        """Record a failure now being handled under this handler's name in the step log."""
        self._failed_handler = handler_name

    async def commit(self) -> None:
        """Commit the buffered checkpoint. A driver error becomes SagaStorageError naming the
        saga; sagakit's own errors (fencing, serialisation, a storage's own SagaStorageError)
        pass through, given the saga's name and the step at hand if they lack them."""
        try:
            await self.run.commit()
        except SagaError as exc:
            exc.locate(saga_id=self.saga_id, saga_name=self.saga.name,
                       step_name=self._failed_handler or None)
            self.commit_error = exc
            raise
        except Exception as exc:
            error = self.commit_error = SagaStorageError(
                f"saga {self.saga.name!r} {self.saga_id}: a checkpoint could not be written "
                f"({type(exc).__name__}: {exc}); the saga stays at its last checkpoint and can "
                "be recovered",
                saga_id=self.saga_id,
                step_name=self._failed_handler or None,
                saga_name=self.saga.name,
            )
            raise error from exc

    async def park(self) -> None:
        await self.run.update_status(self.saga_id, SagaStatus.PARKED)
        await self.commit()
        self.status = SagaStatus.PARKED

    # -- forward --------------------------------------------------------------------------------

    async def _forward(self, plan: Forward) -> AsyncIterator[SagaStepResult[C, Any]]:
        specs = self.saga.step_specs
        if plan.start == len(specs):
            await self._finish_forward()
            return
        completed = list(plan.completed)
        self._attempt = plan.attempt  # an earlier attempt at the first step (a resumed saga)
        self.past_pivot = self.past_pivot or plan.past_pivot
        if plan.attempts:  # failed attempts of the step the saga resumes at
            self._resumed = (self._next_handler(plan), plan.attempts)
        async with LeaseKeeper(self.run, self.lease_seconds) as self.caller.keeper:
            for index in range(plan.start, len(specs)):
                try:
                    result = await self._forward_step(index, completed)
                except Suspended:  # a durable wait: the saga rests WAITING, checkpointed
                    self.status = SagaStatus.WAITING
                    return
                yield result
                if index < len(specs) - 1 and self.should_stop():
                    return  # a graceful shutdown: the saga rests at this checkpoint

    async def _forward_step(
        self, index: int, completed: list[CompletedStep]
    ) -> SagaStepResult[C, Any]:
        """Run step ``index`` and write its checkpoint (completing the saga after the last)."""
        run, saga_id = self.run, self.saga_id
        previous = self._stored
        spec = self.saga.step_specs[index]
        if self.caller.keeper is not None:  # outside the try: a lost lease is not a step failure
            self.caller.keeper.ensure(saga_id, self.saga.name, spec.name)
        try:
            if spec.fallback is None:
                handler_name = spec.name
                result = await self.call_act(handler_name)
            else:
                result, handler_name = await self._run_fallback(spec)
            data = self._encode_changed(handler_name)
        except SagaLeaseLostError:
            raise  # another run owns the saga (or may): nothing to record, nothing to undo
        except Exception as exc:
            if exc is self.commit_error:  # a checkpoint within the step (a failed attempt,
                raise  # a fallback's hand-over) failed: the saga rests at its last checkpoint
            await self._give_up(exc, completed)
            raise
        await run.log_step(saga_id, handler_name, SagaAction.ACT, SagaStepStatus.COMPLETED,
                           attempt=self.completed_attempt)
        if data is not None:
            await run.update_context(saga_id, data)
        pivot = spec.pivot
        if pivot:  # the point of no return, durable with this checkpoint
            await run.pivot(saga_id)
        last = index == len(self.saga.step_specs) - 1
        if last:
            await run.update_status(saga_id, SagaStatus.COMPLETED)
        try:
            await self.commit()
        except (SagaSerializationError, SagaStorageRejectedError) as exc:
            # The storage refused what the step left (a context too large, a value it cannot
            # keep): not transient, so the step fails here instead of being run again and again
            # by recovery.
            await run.rollback()
            self._stored, self._unstorable = previous, True
            error = type(exc)(
                f"saga {self.saga.name!r} {saga_id}: step {handler_name!r} left a context "
                f"the storage cannot hold: {exc.message}",
                saga_id=saga_id, step_name=handler_name, saga_name=self.saga.name,
            )
            await self._give_up(error, completed)
            raise error from exc
        completed.append(CompletedStep(index, handler_name))
        if pivot:
            self.past_pivot = True
        if last:
            self.status = SagaStatus.COMPLETED
        return result

    async def _give_up(self, exc: Exception, completed: list[CompletedStep]) -> None:
        """The step failed for good: before the pivot, the saga compensates; past it, it is
        PARKED, the failure in its log, for an operator to resume after a fix."""
        if self.past_pivot:
            await self._park_past_pivot(exc)
        else:
            await self._fail_and_compensate(exc, completed)

    async def _park_past_pivot(self, exc: Exception) -> None:
        self.step_error = exc
        error_type, details = describe_error(exc)
        await self.run.log_step(self.saga_id, self._failed_handler, SagaAction.ACT,
                                SagaStepStatus.FAILED, details, error_type=error_type,
                                attempt=self.failed_attempt)
        await self.run.update_status(self.saga_id, SagaStatus.PARKED)
        await self.commit()
        self.status = SagaStatus.PARKED
        exc.add_note(f"sagakit: saga {self.saga_id} is past its pivot, so it was not "
                     "compensated: it is PARKED; resume it (resume_saga, sagakit resume) once "
                     "the cause is fixed")

    async def _fail_and_compensate(self, exc: Exception, completed: list[CompletedStep]) -> None:
        # With nothing to undo, the failure record and FAILED are one checkpoint. (A failed
        # compensation already, of a primary's earlier attempt, keeps the saga COMPENSATING.)
        await self._fail_step(exc, nothing_to_undo=not completed and not self.compensation_failures)
        if completed:
            await self._backward(tuple(reversed(completed)))
        self._annotate(exc)

    async def _finish_forward(self) -> None:
        await self.run.update_status(self.saga_id, SagaStatus.COMPLETED)
        await self.commit()
        self.status = SagaStatus.COMPLETED

    async def _run_fallback(self, spec: StepSpec) -> tuple[SagaStepResult[C, Any], str]:
        """Run a step that has a fallback; return (result, the handler that completed)."""
        assert spec.fallback is not None
        attempt, self._attempt = self._attempt, None  # only the step a resumed run starts at
        if attempt is not None and attempt.primary != spec.name:
            attempt = None
        with saga_log_context(self.saga_id, self.saga.name, spec.name):
            result, handler_name = await spec.fallback.run(self, spec, attempt)
        return result, handler_name

    async def undo_attempt(self, handler_name: str) -> None:
        """Compensate a fallback primary's earlier attempt (a resumed run's, whose outcome is
        unknown) before the alternative runs, retried as any compensation. Its log entry is
        buffered: COMPENSATED is written with the step's checkpoint. Failing for good, it is
        logged FAILED and kept as a compensation failure (the saga stays COMPENSATING for
        recovery to retry it), and its error is raised: the step fails."""
        compensator = SagaCompensator(self.retry, record=self._log_compensation)
        task = CompensationTask(handler_name, partial(self._call_compensate, handler_name))
        failures = await compensator.compensate((task,))
        if failures:
            self.compensation_failures.extend(failures)
            error = failures[0].error
            error.add_note(
                f"sagakit: saga {self.saga_id}: the earlier attempt of {handler_name}, cut off, "
                "could not be compensated; its fallback did not run"
            )
            raise error

    def call_act(self, handler_name: str) -> Awaitable[SagaStepResult[C, Any]]:
        """Run one handler's act through the middleware chain, under its retry policy and
        timeout if it has them (:func:`sagakit.attempts.act_with_retries`). Raises the error of
        the attempt that failed the step (``failed_attempt`` its number),
        :class:`~sagakit.attempts.Suspended` at a durable wait. (Not a coroutine itself: it
        hands back the one to await, a frame less per step.)"""
        options = self._act_options.get(handler_name)
        if options is None:  # the plain step of before forward recovery: one attempt
            self.failed_attempt = self.completed_attempt = None
            return self.act_once(handler_name, 1, None)
        attempt = 1
        resumed = self._resumed
        if resumed is not None and resumed[0] == handler_name:  # the count goes on
            attempt, self._resumed = resumed[1] + 1, None
        self.failed_attempt = None
        return act_with_retries(self, handler_name, options, attempt)

    async def act_once(
        self, handler_name: str, attempt: int, limit: float | None
    ) -> SagaStepResult[C, Any]:
        """One attempt of one handler's act, within ``limit`` seconds if given
        (StepTimeoutError past it)."""
        self._failed_handler = handler_name
        if attempt > 1 and self.caller.keeper is not None:  # the first was checked by the step
            self.caller.keeper.ensure(self.saga_id, self.saga.name, handler_name)
        caller = self.caller
        handler = caller.handlers.get(handler_name)
        if handler is None:
            handler = await caller.handler(handler_name)
        invocation = StepInvocation(
            self.saga_id, self.saga.name, handler_name, SagaAction.ACT, attempt, self.context,
            handler, caller.fencing_token,
        )
        out = await (caller.call(invocation) if limit is None
                     else caller.timed(invocation, limit))
        if type(out) is SagaStepResult:
            return step_result(out.step_type, out.response, self.saga_id, handler_name,
                               out.error_type, out.error_message)
        if isinstance(out, SagaStepResult):  # a subclass: keep its type and extra fields
            return dataclasses.replace(out, saga_id=self.saga_id, step_name=handler_name)
        return step_result(type(handler), out, self.saga_id, handler_name)

    def _encode_changed(self, step_name: str) -> ContextJSON | None:
        """The context's stored form if it changed since the last checkpoint, else None."""
        try:
            data = self.codec.encode_json(self.context)
        except SagaSerializationError as exc:
            raise SagaSerializationError(
                f"saga {self.saga.name!r} {self.saga_id}: step {step_name!r} left the context "
                f"unserialisable: {exc.message}",
                field=exc.field,
                saga_id=self.saga_id,
                step_name=step_name,
                saga_name=self.saga.name,
            ) from exc
        if data == self._stored:
            return None
        self._stored = data
        return ContextJSON(data)

    async def _fail_step(self, exc: Exception, *, nothing_to_undo: bool = False) -> None:
        self.step_error = exc
        error_type, details = describe_error(exc)
        status = SagaStatus.FAILED if nothing_to_undo else SagaStatus.COMPENSATING
        attempt = self.failed_attempt

        async def buffer() -> None:
            await self.run.log_step(
                self.saga_id, self._failed_handler, SagaAction.ACT, SagaStepStatus.FAILED,
                details, error_type=error_type, attempt=attempt,
            )
            await self._buffer_context_if_possible()
            await self.run.update_status(self.saga_id, status)

        await self._commit_way_back(buffer)
        self.status = status

    async def _commit_way_back(self, buffer: Callable[[], Awaitable[None]]) -> None:
        """Buffer a checkpoint of the way back (a failure record, a compensation) with
        ``buffer`` and commit it. The context rides along when it changed; should the storage
        refuse it (too large, a value it cannot keep), the checkpoint is written again without
        it: a failure or a compensation is recorded whatever the step left in the context."""
        stored = self._stored
        await buffer()
        try:
            await self.commit()
        except (SagaSerializationError, SagaStorageRejectedError):
            if self._unstorable or self._stored == stored:
                raise  # the context was not in it: the refusal is about something else
            await self.run.rollback()
            self._stored, self._unstorable = stored, True
            await buffer()
            await self.commit()

    async def _buffer_context_if_possible(self) -> None:
        if self._unstorable:
            return  # the storage refused this context once; keep the last stored one
        try:
            data = self._encode_changed(self._failed_handler)
        except SagaSerializationError:
            return  # keep the last good context; compensations still see the live object
        if data is not None:
            await self.run.update_context(self.saga_id, data)

    def _annotate(self, exc: Exception) -> None:
        if self.compensation_failures:
            names = ", ".join(f.step_name for f in self.compensation_failures)
            exc.add_note(
                f"sagakit: saga {self.saga_id} stays COMPENSATING: compensation of {names} "
                "failed; recovery will retry it"
            )

    # -- backward -------------------------------------------------------------------------------

    async def _backward(self, to_compensate: Sequence[CompletedStep]) -> None:
        if self.status is not SagaStatus.COMPENSATING:
            await self.run.update_status(self.saga_id, SagaStatus.COMPENSATING)
            if to_compensate:  # durable before the first compensate(), never after
                await self.commit()
        if not to_compensate:
            await self.run.update_status(self.saga_id, SagaStatus.FAILED)
            await self.commit()
            self.status = SagaStatus.FAILED
            return
        self.status = SagaStatus.COMPENSATING
        tasks = [CompensationTask(c.handler_name, partial(self._call_compensate, c.handler_name))
                 for c in to_compensate]
        last = tasks[-1].step_name
        failed = [f.step_name for f in self.compensation_failures]  # e.g. a primary's attempt

        async def record(step_name: str, error: Exception | None, attempts: int) -> None:
            if error is not None:
                failed.append(step_name)
            finished = step_name == last and not failed

            async def buffer() -> None:
                await self._log_compensation(step_name, error, attempts)
                self._failed_handler = step_name
                await self._buffer_context_if_possible()
                if finished:
                    await self.run.update_status(self.saga_id, SagaStatus.FAILED)

            await self._commit_way_back(buffer)  # durable before the next compensation

        compensator = SagaCompensator(self.retry, record=record, should_stop=self.should_stop)
        self.compensation_failures.extend(await compensator.compensate(tasks))
        done = not self.compensation_failures and not compensator.stopped
        self.status = SagaStatus.FAILED if done else SagaStatus.COMPENSATING

    async def _log_compensation(self, step_name: str, error: Exception | None,
                                attempts: int) -> None:
        if error is None:
            await self.run.log_step(self.saga_id, step_name, SagaAction.COMPENSATE,
                                    SagaStepStatus.COMPENSATED)
            return
        error_type, details = describe_error(error)
        await self.run.log_step(self.saga_id, step_name, SagaAction.COMPENSATE,
                                SagaStepStatus.FAILED, f"{details} (after {attempts} attempts)",
                                error_type=error_type)

    async def _call_compensate(self, handler_name: str, attempt: int) -> None:
        if self.caller.keeper is not None:  # SagaLeaseLostError ends the compensation, no retry
            self.caller.keeper.ensure(self.saga_id, self.saga.name, handler_name)
        caller = self.caller
        handler = await caller.handler(handler_name)
        invocation = StepInvocation(
            self.saga_id, self.saga.name, handler_name, SagaAction.COMPENSATE, attempt,
            self.context, handler, caller.fencing_token,
        )
        limit = caller.undo_timeouts.get(handler_name)
        await (caller.call(invocation) if limit is None else caller.timed(invocation, limit))

    async def record_failed_attempt(
        self, handler_name: str, attempt: int, error: BaseException, seconds: float, *,
        durable: bool,
    ) -> None:
        """The checkpoint of a failed attempt that will be retried after ``seconds``: its
        RETRYING entry and the time of the next attempt; ``durable``: WAITING, lease released.
        The live context is put back as the last checkpoint left it first, so the next attempt
        starts from the same context as this one did."""
        self.codec.restore(self.context, self.checkpointed_context)
        error_type, details = describe_error(error)
        await self.run.log_step(self.saga_id, handler_name, SagaAction.ACT,
                                SagaStepStatus.RETRYING, details, error_type=error_type,
                                attempt=attempt)
        await self.run.wait(self.saga_id, seconds, release=durable)
        await self.commit()
        if durable:
            self.status = SagaStatus.WAITING

    def _next_handler(self, plan: Forward) -> str:
        """The handler that runs next at ``plan.start``: a fallback's alternative once its
        hand-over is logged, else the step's own."""
        spec = self.saga.step_specs[plan.start]
        if spec.fallback is not None and plan.attempt is not None and (
                plan.attempt.handed_over is not None):
            return str(spec.fallback.fallback.__name__)
        return spec.name

def _never() -> bool:
    return False
