"""Continuing a stored saga: what its log and status say to do next, and its context decoded.

Used by :class:`~sagakit.transaction.SagaTransaction` (a resumed saga) and by the recovery calls
(:mod:`sagakit.recovery`), after the saga's lease was taken.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sagakit.context import ContextCodec
from sagakit.exceptions import SagaDefinitionError, SagaSerializationError
from sagakit.plan import Finished, Mismatch, Plan, decide
from sagakit.records import TERMINAL_STATUSES, SagaState, SagaStatus
from sagakit.saga import Saga
from sagakit.storage.protocol import LeasedRun

__all__ = ["Resumption", "deadline_of", "prepare_resume"]

C = TypeVar("C")
logger = logging.getLogger("sagakit")


def deadline_of(state: SagaState, saga: Saga[Any], created: bool) -> float | None:
    """A saga's deadline as seconds since the epoch: the stored one, or for a saga this run
    just created, its definition's ``deadline`` from now (the new row is not read back)."""
    if state.deadline_at is not None:
        return state.deadline_at.timestamp()
    if created and saga.deadline is not None:
        return time.time() + saga.deadline
    return None


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
    stored saga is another saga's, and SagaSerializationError, writing nothing, when its stored
    context does not fit the context type (see :meth:`ContextCodec.decode`). (A commit-per-call
    storage without ``get_saga`` cannot tell the stored name: the state then has an empty
    name, and the check is skipped.)"""
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
    try:
        context = decode(stored if isinstance(stored, dict) else dict(stored))
    except SagaSerializationError as exc:  # nothing run, nothing written but the claim
        raise SagaSerializationError(
            f"saga {saga.name!r} {state.saga_id}: {exc.message}; nothing was run",
            field=exc.field, saga_id=state.saga_id, saga_name=saga.name,
        ) from exc
    return Resumption(plan, context, codec.encode_json(context))
