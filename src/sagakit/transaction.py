"""SagaTransaction: run a saga (or resume one by id) and stream a result per completed step."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any, Generic, TypeVar
from uuid import UUID

from sagakit import settings
from sagakit.compensator import RetryPolicy
from sagakit.container import as_container
from sagakit.context import codec_for
from sagakit.exceptions import SagaError, SagaParkedError, SagaSerializationError
from sagakit.execution import Execution
from sagakit.middleware import (
    Middleware,
    SagaRun,
    enter_log_scope,
    leave_log_scope,
    log_scope,
    observe_saga,
)
from sagakit.plan import Forward, Plan
from sagakit.records import ContextJSON, SagaStatus
from sagakit.resumption import deadline_of, prepare_resume
from sagakit.saga import Saga
from sagakit.step import SagaStepResult
from sagakit.storage.compat import open_run
from sagakit.storage.memory import MemorySagaStorage
from sagakit.storage.protocol import SagaStorage

__all__ = ["SagaTransaction", "check_options"]

C = TypeVar("C")


class SagaTransaction(Generic[C]):
    """Runs a saga's steps in order; iterate it to drive it::

        async with saga.transaction(context=ctx, container=c, storage=s) as transaction:
            async for step_result in transaction:
                ...

    Yields one :class:`SagaStepResult` per completed step, after that step's checkpoint is
    durable. When a step raises an ``Exception`` the completed steps are compensated in reverse
    order and then that exception is raised from the iteration. Other ``BaseException``\\s
    (cancellation, KeyboardInterrupt, SystemExit) and breaking out of the loop leave the saga at
    its last checkpoint, lease released, for recovery or a later resume to finish.

    With the ``saga_id`` of an existing saga, the stored saga is resumed with its stored context
    (the ``context`` argument is then ignored; read :attr:`context`): a terminal saga yields
    nothing and writes nothing; a saga leased by a live run raises SagaBusyError, a PARKED one
    SagaParkedError, both before anything is written.

    The numbers are checked here, before anything is written: the ``compensation_retry_*``
    options as :class:`~sagakit.RetryPolicy` checks them, ``lease_seconds`` finite seconds
    >= 0.1, ``max_recovery_attempts`` an integer >= 1; a bad one raises ValueError naming it.
    """

    def __init__(
        self,
        *,
        saga: Saga[C],
        context: C,
        container: Any = None,
        storage: SagaStorage | None = None,
        saga_id: UUID | None = None,
        compensation_retry_count: int = 3,
        compensation_retry_delay: float = 1.0,
        compensation_retry_backoff: float = 2.0,
        compensation_retry_max_delay: float = 60.0,
        compensation_retry_jitter: float = 0.0,
        middlewares: Sequence[Middleware] = (),
        lease_seconds: float = 30.0,
        max_recovery_attempts: int = 5,
    ) -> None:
        options = (compensation_retry_count, compensation_retry_delay,
                   compensation_retry_backoff, compensation_retry_max_delay,
                   compensation_retry_jitter, lease_seconds, max_recovery_attempts)
        try:
            self.retry, lease_seconds, max_recovery_attempts = _checked(*options)
        except TypeError:  # an unhashable value, so no number: checked uncached, it is refused
            self.retry, lease_seconds, max_recovery_attempts = _check(*options)
        self.saga = saga
        self.saga_id: UUID = saga_id if saga_id is not None else uuid.uuid4()
        self.codec = codec_for(saga.context_type or type(context))
        try:
            self._initial = self.codec.encode_json(context)
        except SagaSerializationError as exc:
            raise SagaSerializationError(
                f"saga {saga.name!r} {self.saga_id}: {exc.message}",
                field=exc.field,
                saga_id=self.saga_id,
                saga_name=saga.name,
            ) from exc
        self.context: C = context
        self.storage: SagaStorage = storage if storage is not None else MemorySagaStorage()
        self.container = as_container(container)
        self.middlewares = tuple(middlewares)
        self.lease_seconds = lease_seconds
        self.max_recovery_attempts = max_recovery_attempts
        self.status: SagaStatus | None = None
        """The saga's status as last written by this transaction (None before it starts)."""
        self.resumed = False
        """True when the saga_id already existed and the stored saga was resumed."""
        self.execution: Execution[C] | None = None
        self._iterator: AsyncGenerator[SagaStepResult[C, Any], None] | None = None

    async def __aenter__(self) -> SagaTransaction[C]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncGenerator[SagaStepResult[C, Any], None]:
        if self._iterator is None:
            self._iterator = self._iterate()
        return self._iterator

    async def aclose(self) -> None:
        """Stop driving the saga (it stays at its last checkpoint) and release its lease."""
        if self._iterator is not None:
            await self._iterator.aclose()

    async def run(self) -> SagaStatus:
        """Drive the saga to its end, discarding step results; return the final status."""
        async for _ in self:
            pass
        assert self.status is not None
        return self.status

    async def _iterate(self) -> AsyncGenerator[SagaStepResult[C, Any], None]:
        # The saga's log scope is set while this generator runs, and only then: it is left
        # before each yield (the caller's code runs there) and entered again after.
        saga, saga_id = self.saga, self.saga_id
        scope = log_scope(saga_id, saga.name)
        token = enter_log_scope(scope)
        try:
            async with open_run(self.storage) as run:
                try:
                    if saga.deadline is None:  # runs of older protocols know no deadline
                        state, created = await run.start(
                            saga_id, saga.name, ContextJSON(self._initial),
                            fingerprint=saga.fingerprint, lease_seconds=self.lease_seconds)
                    else:
                        state, created = await run.start(
                            saga_id, saga.name, ContextJSON(self._initial),
                            fingerprint=saga.fingerprint, lease_seconds=self.lease_seconds,
                            deadline_seconds=saga.deadline)
                except SagaError as exc:
                    exc.locate(saga_id=saga_id, saga_name=saga.name)
                    raise
                self.status = state.status
                observed = SagaRun(saga_id, saga.name, "run" if created else "resume",
                                   state.status)
                async with observe_saga(self.middlewares, observed):
                    try:
                        execution, plan = await self._execution(run, state, created)
                        try:
                            async for result in execution.execute(plan):
                                leave_log_scope(token)
                                try:
                                    yield result
                                finally:
                                    token = enter_log_scope(scope)
                        finally:
                            self.status = execution.status
                    finally:
                        observed.status = self.status
                        if self.execution is not None:
                            observed.error = self.execution.step_error
        finally:
            leave_log_scope(token)

    async def _execution(
        self, run: Any, state: Any, created: bool
    ) -> tuple[Execution[C], Plan]:
        plan, stored = await self._plan(run, state, created)
        execution = self.execution = Execution(
            saga=self.saga, saga_id=self.saga_id, run=run, codec=self.codec,
            context=self.context, stored_context=stored, container=self.container,
            middlewares=self.middlewares, retry=self.retry,
            lease_seconds=self.lease_seconds, status=state.status,
            deadline_at=(None if state.deadline_at is None and self.saga.deadline is None
                         else deadline_of(state, self.saga, created)),
            past_pivot=state.past_pivot,
        )
        return execution, plan

    async def _plan(self, run: Any, state: Any, created: bool) -> tuple[Plan, bytes]:
        """What to run: everything for a new saga; for a stored one, what its log says is left
        (adopting the stored context). Raises SagaParkedError for a parked saga."""
        if created:
            return Forward(0, ()), self._initial
        self.resumed = True
        saga = self.saga
        if state.status is SagaStatus.PARKED:
            raise SagaParkedError(
                f"saga {saga.name!r} {self.saga_id} is parked; resume or abort it explicitly",
                saga_id=self.saga_id, saga_name=saga.name,
            )
        resumption = await prepare_resume(
            run, state, saga, self.codec.decode, self.codec,
            max_recovery_attempts=self.max_recovery_attempts,
        )
        if resumption.context is not None:
            self.context = resumption.context
        return resumption.plan, resumption.stored


def _check(
    count: Any, delay: Any, backoff: Any, max_delay: Any, jitter: Any, lease: Any, attempts: Any,
) -> tuple[RetryPolicy, float, int]:
    """A transaction's numeric settings, checked (ValueError naming the option)."""
    return (RetryPolicy(count, delay, backoff, max_delay, jitter), settings.lease_seconds(lease),
            settings.recovery_attempts(attempts))


# A transaction per saga need not check the same settings again; ``typed``: ``True`` cannot pass
# for an already accepted ``1``, and a refused value is never cached (the check raised).
_checked = functools.lru_cache(maxsize=64, typed=True)(_check)

_RETRY_FIELDS = {
    "compensation_retry_count": "attempts",
    "compensation_retry_delay": "delay",
    "compensation_retry_backoff": "backoff",
    "compensation_retry_max_delay": "max_delay",
    "compensation_retry_jitter": "jitter",
}


def check_options(options: Mapping[str, Any]) -> None:
    """Check transaction options given ahead of any saga (``bootstrap(**options)``) as each
    transaction will: ValueError naming a bad number, TypeError naming an unknown option."""
    known = (*_RETRY_FIELDS, "lease_seconds", "max_recovery_attempts")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown transaction option {unknown[0]!r} "
                        f"(the options are {', '.join(known)})")
    RetryPolicy(**{_RETRY_FIELDS[k]: v for k, v in options.items() if k in _RETRY_FIELDS})
    if "lease_seconds" in options:
        settings.lease_seconds(options["lease_seconds"])
    if "max_recovery_attempts" in options:
        settings.recovery_attempts(options["max_recovery_attempts"])
