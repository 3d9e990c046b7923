"""Finishing sagas that a crash, a deploy or a cancellation left in progress.

- :func:`recover_saga` drives one interrupted saga to a terminal state under Strict Backward
  Recovery (see :mod:`sagakit.plan`) and returns its final status.
- :func:`resume_saga` is the operator's explicit call for a PARKED saga.
- :func:`abort_saga` compensates a saga now, on purpose.

Each checks its numbers first (ValueError naming the option, as a transaction checks them;
nothing read or written), then claims the saga's lease: a saga leased by a live run raises
SagaBusyError and nothing is written.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from uuid import UUID

from sagakit import settings
from sagakit.compensator import RetryPolicy
from sagakit.container import as_container
from sagakit.context import ContextCodec, codec_for
from sagakit.exceptions import SagaDefinitionError, SagaPastPivotError
from sagakit.execution import Execution
from sagakit.middleware import Middleware, SagaRun, observe_saga, saga_log_context
from sagakit.plan import ABORTED, Backward, Finished, Forward, Mismatch
from sagakit.records import (
    TERMINAL_STATUSES,
    SagaAction,
    SagaState,
    SagaStatus,
    SagaStepStatus,
)
from sagakit.resumption import Resumption, deadline_of, prepare_resume
from sagakit.saga import Saga
from sagakit.storage.compat import open_run
from sagakit.storage.protocol import LeasedRun, SagaStorage

__all__ = ["RecoveryOptions", "abort_saga", "recover_saga", "resume_saga"]

C = TypeVar("C")


def _decoder(saga: Saga[C], context_builder: Any) -> Callable[[dict[str, Any]], C]:
    if context_builder is None:
        if saga.context_type is None:
            raise SagaDefinitionError(
                f"saga {saga.name!r} has no context type parameter; pass context_builder",
                saga_name=saga.name,
            )
        return codec_for(saga.context_type).decode
    if isinstance(context_builder, type):
        return codec_for(context_builder).decode
    return context_builder  # type: ignore[no-any-return]


def _instance(saga: Saga[C] | type[Saga[C]]) -> Saga[C]:
    return saga() if isinstance(saga, type) else saga


async def recover_saga(
    saga: Saga[C] | type[Saga[C]],
    saga_id: UUID,
    context_builder: type[C] | Callable[[dict[str, Any]], C] | None = None,
    container: Any = None,
    storage: SagaStorage | None = None,
    *,
    middlewares: Sequence[Middleware] = (),
    max_recovery_attempts: int = 5,
    compensation_retry_count: int = 3,
    compensation_retry_delay: float = 1.0,
    compensation_retry_backoff: float = 2.0,
    compensation_retry_max_delay: float = 60.0,
    compensation_retry_jitter: float = 0.0,
    lease_seconds: float = 30.0,
) -> SagaStatus:
    """Finish one interrupted saga from storage; return its status afterwards.

    A RUNNING (or PENDING) saga continues forward from its first step not recorded COMPLETED;
    a COMPENSATING one finishes compensating. A step failing during forward recovery makes the
    saga compensate, and the return is FAILED, not an error. A compensation that keeps failing
    leaves it COMPENSATING (returned). Each call counts one recovery attempt; a saga past
    ``max_recovery_attempts`` is PARKED instead of run. Terminal sagas return at once, nothing
    written. Raises SagaNotFoundError, SagaBusyError (a live run holds it, nothing written), or
    SagaDefinitionError (the stored saga is another saga, or its log no longer fits the
    definition: it is then parked).
    """
    options = RecoveryOptions(
        middlewares=middlewares, max_recovery_attempts=max_recovery_attempts,
        retry=RetryPolicy(compensation_retry_count, compensation_retry_delay,
                          compensation_retry_backoff, compensation_retry_max_delay,
                          compensation_retry_jitter),
        lease_seconds=lease_seconds,
    )
    return await _drive(_instance(saga), saga_id, context_builder, container, _require(storage),
                        options, "recover")


async def resume_saga(
    saga: Saga[C] | type[Saga[C]],
    saga_id: UUID,
    context_builder: type[C] | Callable[[dict[str, Any]], C] | None = None,
    container: Any = None,
    storage: SagaStorage | None = None,
    *,
    middlewares: Sequence[Middleware] = (),
    compensation_retry_count: int = 3,
    compensation_retry_delay: float = 1.0,
    lease_seconds: float = 30.0,
) -> SagaStatus:
    """Resume a PARKED saga (an operator's explicit call): its recovery attempts restart from 0
    and it continues in the direction its log shows (backward once anything failed or was
    compensated, forward otherwise). Any other non-terminal saga is recovered as by
    :func:`recover_saga` without counting an attempt."""
    options = RecoveryOptions(
        middlewares=middlewares, max_recovery_attempts=1 << 30, lease_seconds=lease_seconds,
        retry=RetryPolicy(compensation_retry_count, compensation_retry_delay),
    )
    return await _drive(_instance(saga), saga_id, context_builder, container, _require(storage),
                        options, "resume")


async def abort_saga(
    saga: Saga[C] | type[Saga[C]],
    saga_id: UUID,
    context_builder: type[C] | Callable[[dict[str, Any]], C] | None = None,
    container: Any = None,
    storage: SagaStorage | None = None,
    *,
    reason: str = "aborted by operator",
    middlewares: Sequence[Middleware] = (),
    compensation_retry_count: int = 3,
    compensation_retry_delay: float = 1.0,
    lease_seconds: float = 30.0,
) -> SagaStatus:
    """Compensate a saga now, on purpose: a RUNNING, PENDING or PARKED saga (not leased by a
    live run) is switched to COMPENSATING, with the abort recorded as a failed act of its next
    step (error type ``SagaAborted``), and its completed steps are compensated. Returns FAILED
    when every compensation succeeded. Terminal sagas are returned as they are.

    A saga past its pivot only goes forward: it cannot be aborted, and SagaPastPivotError is
    raised with nothing written (resume it instead, once the cause is fixed)."""
    options = RecoveryOptions(
        middlewares=middlewares, max_recovery_attempts=1 << 30, lease_seconds=lease_seconds,
        retry=RetryPolicy(compensation_retry_count, compensation_retry_delay),
    )
    instance, store = _instance(saga), _require(storage)
    get_saga = getattr(store, "get_saga", None)
    try:
        stored = None if get_saga is None else await get_saga(saga_id)
    except NotImplementedError:  # a seed-style storage: the log tells, once claimed
        stored = None
    if stored is not None and stored.past_pivot:
        raise _past_pivot(instance, saga_id)
    return await _drive(instance, saga_id, context_builder, container, store, options, "abort",
                        reason)


def _past_pivot(saga: Saga[Any], saga_id: UUID) -> SagaPastPivotError:
    return SagaPastPivotError(
        f"saga {saga.name!r} {saga_id} is past its pivot: it only goes forward and cannot be "
        "aborted; nothing was written (resume it once the cause of its failure is fixed)",
        saga_id=saga_id, saga_name=saga.name,
    )


def _require(storage: SagaStorage | None) -> SagaStorage:
    if storage is None:
        raise ValueError("recovery needs the storage the saga was written to")
    return storage


@dataclasses.dataclass(frozen=True)
class RecoveryOptions:
    """How recovery runs a saga. ``backoff``/``backoff_max``: after a recovery attempt that
    ends without a terminal status, the saga is not listed for recovery again for
    ``min(backoff * 2**(attempts-1), backoff_max)`` seconds. ``should_stop`` is checked after each
    checkpoint (a worker's graceful shutdown).

    Checked when built (ValueError naming the field): ``lease_seconds`` finite seconds >= 0.1,
    ``max_recovery_attempts`` an integer >= 1, ``backoff`` and ``backoff_max`` finite seconds
    >= 0; ``retry`` checks its own numbers."""

    middlewares: Sequence[Middleware] = ()
    max_recovery_attempts: int = 5
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    lease_seconds: float = 30.0
    backoff: float = 5.0
    backoff_max: float = 300.0
    should_stop: Callable[[], bool] | None = None

    def __post_init__(self) -> None:
        settings.lease_seconds(self.lease_seconds)
        settings.recovery_attempts(self.max_recovery_attempts)
        settings.seconds("backoff", self.backoff)
        settings.seconds("backoff_max", self.backoff_max)

    def wait_after(self, attempts: int) -> float:
        """Seconds before a saga after ``attempts`` recovery attempts is listed again: finite
        and >= 0 for any number of attempts."""
        try:
            wait = math.ldexp(self.backoff, max(attempts - 1, 0))
        except OverflowError:  # past the float range: the cap applies
            wait = math.inf
        return min(wait, self.backoff_max)


async def _drive(
    saga: Saga[C],
    saga_id: UUID,
    context_builder: Any,
    container: Any,
    storage: SagaStorage,
    options: RecoveryOptions,
    mode: str,
    reason: str = "",
    claimed: SagaState | None = None,
    claimed_at: float | None = None,
) -> SagaStatus:
    decode = _decoder(saga, context_builder)
    codec: ContextCodec[Any] = codec_for(saga.context_type or (
        context_builder if isinstance(context_builder, type) else dict))
    explicit = mode != "recover"
    with saga_log_context(saga_id, saga.name):
        async with open_run(storage) as run:
            if claimed is not None:  # a worker's claim_due already leased it to this process
                run.adopt(claimed, options.lease_seconds, sent=claimed_at)
                state = claimed
            else:
                state = await run.claim(
                    saga_id, lease_seconds=options.lease_seconds, count_attempt=not explicit,
                    allow_parked=explicit, name=saga.name,
                )
            observed = SagaRun(saga_id, saga.name, mode, state.status)
            async with observe_saga(options.middlewares, observed):
                try:
                    resumption = await prepare_resume(
                        run, state, saga, decode, codec,
                        max_recovery_attempts=options.max_recovery_attempts,
                        resume_parked=explicit,
                    )
                except Exception:
                    # e.g. a stored context that does not fit: back off like a failed attempt,
                    # rather than be claimed again at every poll until parked
                    if mode == "recover":
                        run.retry_after = options.wait_after(state.recovery_attempts)
                    raise
                if isinstance(resumption.plan, Finished):
                    observed.status = resumption.plan.status
                    return resumption.plan.status
                execution = Execution(
                    saga=saga, saga_id=saga_id, run=run, codec=codec,
                    context=resumption.context, stored_context=resumption.stored,
                    container=as_container(container), middlewares=options.middlewares,
                    retry=options.retry, lease_seconds=options.lease_seconds, status=state.status,
                    deadline_at=deadline_of(state, saga, False), past_pivot=state.past_pivot,
                )
                stopping = options.should_stop
                if stopping is not None:
                    execution.should_stop = stopping
                try:
                    return await _carry_out(execution, run, saga, saga_id, resumption, mode, reason)
                finally:
                    observed.status, observed.error = execution.status, execution.step_error
                    if mode == "recover" and execution.status not in TERMINAL_STATUSES and not (
                        stopping is not None and stopping()
                    ):
                        run.retry_after = options.wait_after(state.recovery_attempts)


async def _carry_out(
    execution: Execution[Any],
    run: LeasedRun,
    saga: Saga[Any],
    saga_id: UUID,
    resumption: Resumption[Any],
    mode: str,
    reason: str,
) -> SagaStatus:
    if isinstance(resumption.plan, Mismatch):
        async for _ in execution.execute(resumption.plan):
            pass  # parks and raises SagaDefinitionError
    if mode == "abort" and isinstance(resumption.plan, Forward) and resumption.plan.past_pivot:
        raise _past_pivot(saga, saga_id)  # the log says so (the claim alone was written)
    if mode != "recover":
        await _set_direction(run, saga, saga_id, resumption, mode, reason, execution)
    if mode == "abort" and isinstance(resumption.plan, Forward):
        await execution.compensate(resumption.plan.to_abort())
        return execution.status
    try:
        async for _ in execution.execute(resumption.plan):
            pass
    except Exception as exc:
        if exc is not execution.step_error:
            raise
    return execution.status


async def _set_direction(
    run: LeasedRun,
    saga: Saga[Any],
    saga_id: UUID,
    resumption: Resumption[Any],
    mode: str,
    reason: str,
    execution: Execution[Any],
) -> None:
    """Make an explicit call's direction durable before any step runs."""
    plan = resumption.plan
    await run.reset_recovery_attempts(saga_id)
    if mode == "abort" and isinstance(plan, Forward):
        specs = saga.step_specs
        step = specs[min(plan.start, len(specs) - 1)].name
        await run.log_step(saga_id, step, SagaAction.ACT, SagaStepStatus.FAILED,
                           f"{ABORTED}: {reason}", error_type=ABORTED)
        status = SagaStatus.COMPENSATING
    else:
        status = SagaStatus.COMPENSATING if isinstance(plan, Backward) else SagaStatus.RUNNING
    await run.update_status(saga_id, status)
    await run.commit()
    execution.status = status

