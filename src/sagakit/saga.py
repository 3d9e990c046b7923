"""Saga definitions: an ordered list of step handler classes sharing one context type.

A definition is validated when its class is created, so a malformed saga fails at import time,
long before anything is written.
"""

from __future__ import annotations

import hashlib
import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar
from uuid import UUID

from sagakit.exceptions import SagaDefinitionError
from sagakit.step import SagaStepHandler

if TYPE_CHECKING:
    from sagakit.middleware import Middleware
    from sagakit.storage.protocol import SagaStorage
    from sagakit.transaction import SagaTransaction

__all__ = ["Saga", "StepSpec"]

ContextT = TypeVar("ContextT")


class StepSpec:
    """One entry of a saga's step list, as the engine sees it.

    A plain step has one handler; a fallback step (see :class:`sagakit.Fallback`) has a primary
    and an alternative. ``name`` is what the step log records.
    """

    __slots__ = ("fallback", "handler", "name")

    def __init__(self, handler: type[SagaStepHandler[Any, Any]], fallback: Any = None) -> None:
        self.handler = handler
        self.fallback = fallback
        self.name = handler.__name__

    def handler_names(self) -> tuple[str, ...]:
        if self.fallback is None:
            return (self.name,)
        return (self.name, self.fallback.fallback.__name__)

    def __repr__(self) -> str:
        return f"StepSpec({self.name})"


class Saga(Generic[ContextT]):
    """Base class of saga definitions.

    Subclass it with the context type as parameter and list the step handler classes::

        class OrderSaga(Saga[OrderContext]):
            steps = [ReserveInventory, ChargePayment, ShipOrder]

    ``name`` defaults to the class name; storage records it and recovery looks the definition up
    by it, so keep it stable across deployments. Raises :class:`SagaDefinitionError` at class
    creation for a non-handler step, a duplicate step, or a step whose context type does not
    accept the saga's.
    """

    steps: ClassVar[Sequence[Any]] = ()
    name: ClassVar[str] = ""
    context_type: ClassVar[type[Any] | None] = None
    step_specs: ClassVar[tuple[StepSpec, ...]] = ()
    fingerprint: ClassVar[str] = ""
    handler_types: ClassVar[dict[str, type[SagaStepHandler[Any, Any]]]] = {}
    """Every handler class of the saga (fallback alternatives included), by step log name."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__ or not cls.__dict__["name"]:
            cls.name = cls.__name__
        _check_stored_name(cls.name, cls.name, None)
        found = _generic_arg(cls, Saga, 0)
        if found is not None:
            cls.context_type = found
        cls.step_specs = tuple(_validate_steps(cls))
        cls.fingerprint = definition_fingerprint(cls.step_specs)
        cls.handler_types = {
            name: spec.handler if name == spec.name else spec.fallback.fallback
            for spec in cls.step_specs
            for name in spec.handler_names()
        }

    def transaction(
        self,
        context: ContextT,
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
    ) -> SagaTransaction[ContextT]:
        """Run this saga: returns a :class:`SagaTransaction` to iterate (optionally inside
        ``async with``). Without a storage, a fresh in-memory storage is used.

        Raises ValueError naming the option for a number out of range (see
        :class:`SagaTransaction`: NaN and infinities are refused everywhere, ``lease_seconds``
        must be >= 0.1), and SagaSerializationError if the context cannot be stored, before
        anything is written.
        """
        from sagakit.transaction import SagaTransaction

        return SagaTransaction(
            saga=self,
            context=context,
            container=container,
            storage=storage,
            saga_id=saga_id,
            compensation_retry_count=compensation_retry_count,
            compensation_retry_delay=compensation_retry_delay,
            compensation_retry_backoff=compensation_retry_backoff,
            compensation_retry_max_delay=compensation_retry_max_delay,
            compensation_retry_jitter=compensation_retry_jitter,
            middlewares=middlewares,
            lease_seconds=lease_seconds,
            max_recovery_attempts=max_recovery_attempts,
        )


def definition_fingerprint(specs: Sequence[StepSpec]) -> str:
    """A short hash of the step names in order (fallback alternatives included)."""
    text = "\n".join("|".join(spec.handler_names()) for spec in specs)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


MAX_NAME_LENGTH = 255
"""The longest saga or step name a storage keeps (its column's width)."""


def _check_stored_name(name: Any, saga_name: str, step_name: str | None) -> None:
    """A saga's or step's name is stored with every saga and log entry: a text every storage
    keeps, refused at class creation rather than by the database at the first start."""
    what = "saga name" if step_name is None else "step name"
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or "\x00" in name:
        raise SagaDefinitionError(
            f"saga {saga_name!r}: {what} {name!r:.80} must be a string of at most "
            f"{MAX_NAME_LENGTH} characters without U+0000",
            saga_name=saga_name, step_name=step_name,
        )


def _validate_steps(cls: type[Saga[Any]]) -> list[StepSpec]:
    specs: list[StepSpec] = []
    seen: set[str] = set()
    for position, step in enumerate(cls.steps, start=1):
        spec = _to_spec(cls, step, position)
        for handler_name in spec.handler_names():
            _check_stored_name(handler_name, cls.name, handler_name)
            if handler_name in seen:
                raise SagaDefinitionError(
                    f"saga {cls.name!r}: step {handler_name!r} appears more than once",
                    step_name=handler_name,
                    saga_name=cls.name,
                )
            seen.add(handler_name)
        specs.append(spec)
    return specs


def _to_spec(cls: type[Saga[Any]], step: Any, position: int) -> StepSpec:
    to_spec = getattr(step, "to_step_spec", None)
    if to_spec is not None and not isinstance(step, type):
        spec: StepSpec = to_spec()
        for handler in (spec.handler, spec.fallback.fallback if spec.fallback else None):
            if handler is not None:
                _check_handler(cls, handler, position)
        return spec
    _check_handler(cls, step, position)
    return StepSpec(step)


def _check_handler(cls: type[Saga[Any]], step: Any, position: int) -> None:
    if not (isinstance(step, type) and issubclass(step, SagaStepHandler)):
        raise SagaDefinitionError(
            f"saga {cls.name!r}: step #{position} ({step!r}) is not a SagaStepHandler subclass",
            step_name=getattr(step, "__name__", repr(step)),
            saga_name=cls.name,
        )
    step_context = _generic_arg(step, SagaStepHandler, 0)
    saga_context = cls.context_type
    if step_context is None or saga_context is None:
        return
    if not _accepts(step_context, saga_context):
        raise SagaDefinitionError(
            f"saga {cls.name!r}: step {step.__name__!r} handles {_type_name(step_context)} "
            f"contexts but the saga's context is {_type_name(saga_context)}",
            step_name=step.__name__,
            saga_name=cls.name,
        )


def _accepts(step_context: Any, saga_context: Any) -> bool:
    step_origin = typing.get_origin(step_context) or step_context
    saga_origin = typing.get_origin(saga_context) or saga_context
    if step_origin is Any or step_origin is object:
        return True
    if not isinstance(step_origin, type) or not isinstance(saga_origin, type):
        return True  # a Protocol, Union or other typing construct: don't second-guess it
    return issubclass(saga_origin, step_origin)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", repr(tp))


def _generic_arg(cls: type, base: type, index: int) -> Any:
    """The concrete type argument given to ``base`` somewhere in ``cls``'s bases, or None."""
    for klass in cls.__mro__:
        for orig in getattr(klass, "__orig_bases__", ()):
            origin = typing.get_origin(orig)
            if isinstance(origin, type) and issubclass(origin, base):
                args = typing.get_args(orig)
                if len(args) > index and not isinstance(args[index], TypeVar):
                    return args[index]
    return None
