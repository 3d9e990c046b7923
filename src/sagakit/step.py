"""Step handlers and the result the saga yields for each completed step."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Generic, TypeVar
from uuid import UUID

from sagakit.invocation import current_invocation

__all__ = ["SagaStepHandler", "SagaStepResult"]

ContextT = TypeVar("ContextT")
ResponseT = TypeVar("ResponseT")


@dataclasses.dataclass(frozen=True, slots=True)
class SagaStepResult(Generic[ContextT, ResponseT]):
    """What a saga yields after each completed step.

    ``response`` is what the step's ``act()`` returned (None if it returned nothing). ``error_type``
    and ``error_message`` are set when the step completed through a fallback: they describe why the
    primary step did not (see :class:`sagakit.Fallback`).
    """

    step_type: type[SagaStepHandler[Any, Any]]
    response: ResponseT | None = None
    saga_id: UUID | None = None
    step_name: str | None = None
    error_type: str | None = None
    error_message: str | None = None

    @property
    def step_result(self) -> ResponseT | None:
        """Alias of ``response`` (the seed library's name)."""
        return self.response


_new = object.__new__
_set_fields = tuple(
    SagaStepResult.__dict__[f.name].__set__ for f in dataclasses.fields(SagaStepResult)
)


def step_result(
    step_type: type[Any], response: Any, saga_id: UUID, step_name: str,
    error_type: str | None = None, error_message: str | None = None,
) -> SagaStepResult[Any, Any]:
    """Build a result as the engine does for every step: the same as the constructor, without
    the frozen dataclass's per-field ``object.__setattr__`` (half the cost)."""
    result: SagaStepResult[Any, Any] = _new(SagaStepResult)
    set_type, set_response, set_id, set_name, set_error_type, set_message = _set_fields
    set_type(result, step_type)
    set_response(result, response)
    set_id(result, saga_id)
    set_name(result, step_name)
    set_error_type(result, error_type)
    set_message(result, error_message)
    return result


class SagaStepHandler(abc.ABC, Generic[ContextT, ResponseT]):
    """One step of a saga: ``act`` moves forward, ``compensate`` undoes what ``act`` did.

    ``act`` may mutate the shared context; the context is checkpointed after every completed step.
    It may return ``self._generate_step_result(response)``, the bare response, or None.

    ``compensate`` must be idempotent: after a crash it can run again for a step whose compensation
    was cut off before its checkpoint. It is retried with backoff when it raises.

    During ``act``/``compensate``, :attr:`idempotency_key` is a stable key (saga id, step, action)
    to pass to the services the step calls, so a step re-run after a crash can be deduplicated,
    and :attr:`fencing_token` tells those services which run of the saga is the current one
    (see docs/fencing.md).
    """

    @property
    def idempotency_key(self) -> str:
        """``"<saga id>:<step name>:<act|compensate>"`` of the invocation running now.

        The same for every attempt and every re-run after a crash. Raises RuntimeError outside a
        step invocation.
        """
        invocation = current_invocation()
        if invocation is None:
            raise RuntimeError("idempotency_key is only available while a step runs")
        return invocation.idempotency_key

    @property
    def fencing_token(self) -> int:
        """The fencing token of the run calling this step: the saga's version when the run took
        its lease. The same for every step of one run; larger in every run that takes the saga
        over later. Send it with :attr:`idempotency_key`: a service that refuses a token lower
        than the highest it saw for the saga refuses the late calls of a run that was paused
        past its lease and replaced. 0 when the storage provides no token. Raises RuntimeError
        outside a step invocation.
        """
        invocation = current_invocation()
        if invocation is None:
            raise RuntimeError("fencing_token is only available while a step runs")
        return invocation.fencing_token

    @abc.abstractmethod
    async def act(self, context: ContextT) -> SagaStepResult[ContextT, ResponseT] | ResponseT | None:
        """Do this step's work."""

    @abc.abstractmethod
    async def compensate(self, context: ContextT) -> None:
        """Undo this step's work. Called only if ``act`` completed and a later step failed."""

    def _generate_step_result(self, response: ResponseT | None = None) -> SagaStepResult[ContextT, ResponseT]:
        """Wrap a response into a step result (the seed library's helper)."""
        return SagaStepResult(step_type=type(self), response=response)
