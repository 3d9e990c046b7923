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
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import Any, Generic, TypeVar
from uuid import UUID

from sagakit.compensator import CompensationFailure, CompensationTask, RetryPolicy, SagaCompensator
from sagakit.container import Container
from sagakit.context import ContextCodec
from sagakit.exceptions import (
    SagaDefinitionError,
    SagaError,
    SagaSerializationError,
    SagaStorageError,
)
from sagakit.invocation import (
    StepInvocation,
    _current,
    current_invocation,
    reset_current,
    set_current,
)
from sagakit.lease import LeaseKeeper
from sagakit.middleware import Middleware, build_chain, saga_log_context
from sagakit.plan import Backward, CompletedStep, Finished, Forward, Mismatch, Plan, decide
from sagakit.records import (
    TERMINAL_STATUSES,
    ContextJSON,
    SagaAction,
    SagaState,
    SagaStatus,
    SagaStepStatus,
)
from sagakit.saga import Saga, StepSpec
from sagakit.step import SagaStepHandler, SagaStepResult, step_result
from sagakit.storage.protocol import LeasedRun

__all__ = ["Execution", "Resumption", "describe_error", "prepare_resume"]

C = TypeVar("C")
logger = logging.getLogger("sagakit")


def describe_error(exc: BaseException) -> tuple[str, str]:
    """(error_type, details) as recorded in the step log."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return name, f"{kind.__name__}: {exc}"


@dataclasses.dataclass(slots=True)
class Resumption(Generic[C]):
    """What is needed to continue an existing saga: the plan, its stored context decoded, and
    that context's JSON as the engine encodes it (to tell later whether a step changed it)."""

    plan: Plan
    context: C | None
    stored: bytes


async def prepare_resume(
    run: LeasedRun,
    state: SagaState,
    saga: Saga[C],
    decode: Callable[[dict[str, Any]], C],
    codec: ContextCodec[C],
    *,
    max_recovery_attempts: int,
    resume_parked: bool = False,
) -> Resumption[C]:
    """Decide how to continue a claimed saga. Parks it (and returns a Finished plan) when its
    recovery attempts are exhausted. Raises SagaDefinitionError, writing nothing, when the
    stored saga is another saga's. (A commit-per-call storage without ``get_saga`` cannot tell
    the stored name: the state then has an empty name, and the check is skipped.)"""
    if state.name and state.name != saga.name:
        raise SagaDefinitionError(
            f"saga {state.saga_id} is a {state.name!r} saga, not {saga.name!r}",
            saga_id=state.saga_id,
            saga_name=saga.name,
        )
    if state.status in TERMINAL_STATUSES or (
        state.status is SagaStatus.PARKED and not resume_parked
    ):
        return Resumption(Finished(state.status), None, b"")
    if not resume_parked and state.recovery_attempts > max_recovery_attempts:
        logger.error(
            "saga %s %s: %d recovery attempts, more than the %d allowed; parking it",
            saga.name, state.saga_id, state.recovery_attempts, max_recovery_attempts,
        )
        await run.update_status(state.saga_id, SagaStatus.PARKED)
        await run.commit()
        return Resumption(Finished(SagaStatus.PARKED), None, b"")
    history = await run.get_step_history(state.saga_id)
    plan = decide(state.status, saga.step_specs, history, resume_parked=resume_parked)
    if state.fingerprint and state.fingerprint != saga.fingerprint:
        logger.warning(
            "saga %s %s was started by another version of its definition (steps %s, now %s); "
            "%s", saga.name, state.saga_id, state.fingerprint, saga.fingerprint,
            "its log no longer fits: parking it" if isinstance(plan, Mismatch)
            else "its log still fits the current steps: continuing",
        )
    stored = state.context
    context = decode(stored if isinstance(stored, dict) else dict(stored))
    return Resumption(plan, context, codec.encode_json(context))


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
        self._handlers: dict[str, SagaStepHandler[Any, Any]] = {}
        self._types = saga.handler_types
        self._chain = build_chain(middlewares, _invoke)
        self._failed_handler = ""
        self._unstorable = False
        self._keeper: LeaseKeeper | None = None
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
        async with LeaseKeeper(self.run, self.lease_seconds) as self._keeper:
            await self._backward(plan.to_compensate)
        nothing: tuple[SagaStepResult[C, Any], ...] = ()
        for result in nothing:  # an async generator that yields nothing
            yield result

    async def compensate(self, to_compensate: Sequence[CompletedStep]) -> None:
        """Go backward now (an explicit abort); the caller made COMPENSATING durable first."""
        self.status = SagaStatus.COMPENSATING
        async with LeaseKeeper(self.run, self.lease_seconds) as self._keeper:
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
        saga; sagakit's own errors (fencing, serialisation) pass through unchanged."""
        try:
            await self.run.commit()
        except SagaError:
            raise
        except Exception as exc:
            raise SagaStorageError(
                f"saga {self.saga.name!r} {self.saga_id}: a checkpoint could not be written "
                f"({type(exc).__name__}: {exc}); the saga stays at its last checkpoint and can "
                "be recovered",
                saga_id=self.saga_id,
                step_name=self._failed_handler or None,
                saga_name=self.saga.name,
            ) from exc

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
        async with LeaseKeeper(self.run, self.lease_seconds) as self._keeper:
            for index in range(plan.start, len(specs)):
                yield await self._forward_step(index, completed)
                if index < len(specs) - 1 and self.should_stop():
                    return  # a graceful shutdown: the saga rests at this checkpoint

    async def _forward_step(
        self, index: int, completed: list[CompletedStep]
    ) -> SagaStepResult[C, Any]:
        """Run step ``index`` and write its checkpoint (completing the saga after the last)."""
        run, saga_id = self.run, self.saga_id
        previous = self._stored
        spec = self.saga.step_specs[index]
        if self._keeper is not None:  # outside the try: a lost lease is not a step failure
            self._keeper.ensure(saga_id, self.saga.name, spec.name)
        try:
            if spec.fallback is None:
                handler_name = spec.name
                result = await self.call_act(handler_name)
            else:
                result, handler_name = await self._run_fallback(spec)
            data = self._encode_changed(handler_name)
        except Exception as exc:
            await self._fail_and_compensate(exc, completed)
            raise
        await run.log_step(saga_id, handler_name, SagaAction.ACT, SagaStepStatus.COMPLETED)
        if data is not None:
            await run.update_context(saga_id, data)
        last = index == len(self.saga.step_specs) - 1
        if last:
            await run.update_status(saga_id, SagaStatus.COMPLETED)
        try:
            await self.commit()
        except SagaSerializationError as exc:  # the storage refused the context (too large)
            await run.rollback()
            self._stored, self._unstorable = previous, True
            error = SagaSerializationError(
                f"saga {self.saga.name!r} {saga_id}: step {handler_name!r} left a context "
                f"the storage cannot hold: {exc.message}",
                saga_id=saga_id, step_name=handler_name, saga_name=self.saga.name,
            )
            await self._fail_and_compensate(error, completed)
            raise error from exc
        completed.append(CompletedStep(index, handler_name))
        if last:
            self.status = SagaStatus.COMPLETED
        return result

    async def _fail_and_compensate(self, exc: Exception, completed: list[CompletedStep]) -> None:
        # With nothing to undo, the failure record and FAILED are one checkpoint.
        await self._fail_step(exc, nothing_to_undo=not completed)
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
        with saga_log_context(self.saga_id, self.saga.name, spec.name):
            result, handler_name = await spec.fallback.run(self, spec)
        return result, handler_name

    async def call_act(self, handler_name: str) -> SagaStepResult[C, Any]:
        """Run one handler's act through the middleware chain."""
        self._failed_handler = handler_name
        handler = self._handlers.get(handler_name)
        if handler is None:
            handler = await self._handler(handler_name)
        out = await self._call(StepInvocation(
            self.saga_id, self.saga.name, handler_name, SagaAction.ACT, 1, self.context, handler
        ))
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
        run = self.run
        await run.log_step(
            self.saga_id, self._failed_handler, SagaAction.ACT, SagaStepStatus.FAILED, details,
            error_type=error_type,
        )
        await self._buffer_context_if_possible()
        status = SagaStatus.FAILED if nothing_to_undo else SagaStatus.COMPENSATING
        await run.update_status(self.saga_id, status)
        await self.commit()
        self.status = status

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
        failed: list[str] = []

        async def record(step_name: str, error: Exception | None, attempts: int) -> None:
            run = self.run
            if error is None:
                await run.log_step(self.saga_id, step_name, SagaAction.COMPENSATE,
                                   SagaStepStatus.COMPENSATED)
            else:
                failed.append(step_name)
                error_type, details = describe_error(error)
                await run.log_step(self.saga_id, step_name, SagaAction.COMPENSATE,
                                   SagaStepStatus.FAILED, f"{details} (after {attempts} attempts)",
                                   error_type=error_type)
            self._failed_handler = step_name
            await self._buffer_context_if_possible()
            if step_name == last and not failed:
                await run.update_status(self.saga_id, SagaStatus.FAILED)
            if error is not None:
                await self.commit()  # the compensator calls back only after successes

        compensator = SagaCompensator(self.retry, record=record,
                                      on_after_compensate_step=self.commit,
                                      should_stop=self.should_stop)
        self.compensation_failures = await compensator.compensate(tasks)
        done = not self.compensation_failures and not compensator.stopped
        self.status = SagaStatus.FAILED if done else SagaStatus.COMPENSATING

    async def _call_compensate(self, handler_name: str, attempt: int) -> None:
        if self._keeper is not None:  # SagaLeaseLostError ends the compensation, no retry
            self._keeper.ensure(self.saga_id, self.saga.name, handler_name)
        handler = await self._handler(handler_name)
        await self._call(StepInvocation(
            self.saga_id, self.saga.name, handler_name, SagaAction.COMPENSATE, attempt,
            self.context, handler,
        ))

    async def _call(self, invocation: StepInvocation) -> Any:
        """Call the step through the middleware chain, as the current invocation (which is
        also the log scope of whatever the middlewares and the step log, see SagaLogFilter)."""
        token = _current.set(invocation)
        try:
            if self._chain is not _invoke:
                return await self._chain(invocation)
            # No middleware: what _invoke would do, one coroutine frame less per step.
            if invocation.action is SagaAction.ACT:
                return await invocation.handler.act(invocation.context)
            return await invocation.handler.compensate(invocation.context)
        finally:
            _current.reset(token)

    async def _handler(self, handler_name: str) -> SagaStepHandler[Any, Any]:
        handler = self._handlers.get(handler_name)
        if handler is None:
            handler = await self.container.resolve(self._types[handler_name])
            self._handlers[handler_name] = handler
        return handler


def _never() -> bool:
    return False


async def _invoke(invocation: StepInvocation) -> Any:
    """The end of the middleware chain: call the step (as the current invocation, in case a
    middleware passed on another one)."""
    token = set_current(invocation) if current_invocation() is not invocation else None
    try:
        if invocation.action is SagaAction.ACT:
            return await invocation.handler.act(invocation.context)
        await invocation.handler.compensate(invocation.context)
        return None
    finally:
        if token is not None:
            reset_current(token)
