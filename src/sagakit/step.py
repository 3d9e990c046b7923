"""Step handlers, their options, and the result the saga yields for each completed step."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Generic, TypeVar
from uuid import UUID

from sagakit import settings
from sagakit.invocation import current_invocation
from sagakit.retry import Retry

__all__ = ["OPTION_NAMES", "SagaStepHandler", "SagaStepResult", "check_option",
           "implements_compensate"]

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

    Both must be ``async def`` (a saga refuses a step whose ``act`` or ``compensate`` is not a
    coroutine function when its class is created). ``compensate`` may be left out only by a
    step that comes after its saga's pivot (such a step is never compensated); a saga refuses
    any other step without one, and calling the inherited one raises NotImplementedError.

    Options, as class attributes (all optional, inherited like any attribute; a saga's
    ``steps`` can override them for one saga with :class:`sagakit.Step`):

    - ``retry``: a :class:`sagakit.Retry` for the act (None: the saga's ``retry``, and
      without one a single attempt).
    - ``timeout``: seconds one attempt of the act may take; a longer one is cancelled and
      fails with :class:`sagakit.StepTimeoutError` (retried like any error). None: no limit.
    - ``compensate_timeout``: the same for each attempt of ``compensate``.
    - ``pivot``: True marks the saga's point of no return (at most one per saga): once its act
      is checkpointed, the saga only goes forward; every later step must be retriable.

    A saga checks them when its class is created (SagaDefinitionError naming the saga and the
    step): ``retry`` a Retry or None, timeouts finite seconds > 0 or None, ``pivot`` a bool.
    """

    retry: ClassVar[Retry | None] = None
    timeout: ClassVar[float | None] = None
    compensate_timeout: ClassVar[float | None] = None
    pivot: ClassVar[bool] = False

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

    async def compensate(self, context: ContextT) -> None:
        """Undo this step's work. Called only if ``act`` completed and a later step failed.

        Not implemented here (raises NotImplementedError naming the step): a step that comes
        after its saga's pivot need not implement it; every other step must."""
        raise NotImplementedError(f"step {type(self).__name__!r} does not implement compensate")

    def _generate_step_result(self, response: ResponseT | None = None) -> SagaStepResult[ContextT, ResponseT]:
        """Wrap a response into a step result (the seed library's helper)."""
        return SagaStepResult(step_type=type(self), response=response)


def implements_compensate(handler: type[SagaStepHandler[Any, Any]]) -> bool:
    """Whether the handler class (or a base of it) implements ``compensate``."""
    return handler.compensate is not SagaStepHandler.compensate


OPTION_NAMES = ("retry", "timeout", "compensate_timeout", "pivot")
"""The options a step handler class can set (and :class:`sagakit.Step` override)."""


def check_option(where: str, name: str, value: Any) -> Any:
    """``value`` of step option ``name`` (one of :data:`OPTION_NAMES`) as the engine uses it,
    or an error whose message starts with ``where`` (``"Step(Ship) "``, or ``""``) and the
    option's name: TypeError for a ``retry`` that is not a Retry or None, or a ``pivot`` that
    is not a bool; ValueError (from :mod:`sagakit.settings`) for a timeout that is not finite
    seconds > 0 or None."""
    if name == "retry":
        if value is not None and not isinstance(value, Retry):
            raise TypeError(f"{where}retry must be a sagakit.Retry or None, got {value!r:.80}")
        return value
    if name == "pivot":
        if not isinstance(value, bool):
            raise TypeError(f"{where}pivot must be True or False, got {value!r:.80}")
        return value
    return settings.seconds(f"{where}{name}", value, exclusive=True, allow_none=True)
