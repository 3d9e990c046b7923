"""Saga definitions: an ordered list of step handler classes sharing one context type.

A definition is validated when its class is created, so a malformed saga fails at import time,
long before anything is written.

Forward recovery (see docs/forward-recovery.md): a saga may mark one step its pivot. Steps up
to the pivot are compensable (each must implement ``compensate``); the steps after it are never
compensated, so they need no ``compensate`` but must be retriable (a resolved retry policy of at
least 2 attempts). A saga without a pivot is all compensable: every step implements
``compensate``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar
from uuid import UUID

from sagakit import settings
from sagakit.exceptions import SagaDefinitionError
from sagakit.retry import Retry
from sagakit.step import SagaStepHandler, check_option, implements_compensate

if TYPE_CHECKING:
    from sagakit.middleware import Middleware
    from sagakit.storage.protocol import SagaStorage
    from sagakit.submission import SubmittedSaga
    from sagakit.transaction import SagaTransaction

__all__ = ["Saga", "StepOptions", "StepSpec"]

ContextT = TypeVar("ContextT")


@dataclasses.dataclass(frozen=True, slots=True)
class StepOptions:
    """The options one handler of a step runs with in one saga, resolved when the saga's class
    is created: a ``Step(...)`` override, else the handler class's attribute, else (``retry``
    only) the saga's ``retry``. ``retry`` None: a single attempt; a timeout None: no limit."""

    retry: Retry | None = None
    timeout: float | None = None
    compensate_timeout: float | None = None


NO_OPTIONS = StepOptions()
"""The options of a handler that sets none, in a saga without a default retry (shared)."""


class StepSpec:
    """One entry of a saga's step list, as the engine sees it.

    A plain step has one handler; a fallback step (see :class:`sagakit.Fallback`) has a primary
    and an alternative. ``name`` is what the step log records. ``pivot``: this step is the
    saga's pivot (the primary's class attribute, or a ``Step(...)`` override).
    :meth:`options` gives each handler's resolved :class:`StepOptions`.

    ``overrides`` are the options a ``Step(...)`` entry gave for the primary handler (checked
    already); ``default_retry`` is the saga's ``retry``. A handler class attribute of the
    wrong kind or out of range raises SagaDefinitionError naming the step (the saga's class
    creation adds the saga's name).
    """

    __slots__ = ("_options", "fallback", "handler", "name", "overrides", "pivot")

    def __init__(
        self,
        handler: type[SagaStepHandler[Any, Any]],
        fallback: Any = None,
        *,
        overrides: Mapping[str, Any] | None = None,
        default_retry: Retry | None = None,
    ) -> None:
        self.handler = handler
        self.fallback = fallback
        self.name = handler.__name__
        self.overrides: Mapping[str, Any] = dict(overrides or {})
        self.pivot: bool = (self.overrides["pivot"] if "pivot" in self.overrides
                            else _option(handler, "pivot"))
        self._options = {
            name: _resolve(self.handler_type(name), self.overrides if name == self.name else {},
                           default_retry)
            for name in self.handler_names()
        }

    def handler_names(self) -> tuple[str, ...]:
        if self.fallback is None:
            return (self.name,)
        return (self.name, self.fallback.fallback.__name__)

    def handler_type(self, handler_name: str) -> type[SagaStepHandler[Any, Any]]:
        """The handler class of ``handler_name`` (the primary's or the alternative's)."""
        if handler_name == self.name:
            return self.handler
        handler: type[SagaStepHandler[Any, Any]] = self.fallback.fallback
        return handler

    def options(self, handler_name: str) -> StepOptions:
        """The resolved options of one of this step's handlers (KeyError for another name)."""
        return self._options[handler_name]

    def with_default_retry(self, retry: Retry | None) -> StepSpec:
        """This entry resolved again with ``retry`` as the saga's default."""
        return StepSpec(self.handler, self.fallback, overrides=self.overrides,
                        default_retry=retry)

    def __repr__(self) -> str:
        return f"StepSpec({self.name}{', pivot' if self.pivot else ''})"


def _option(handler: type[SagaStepHandler[Any, Any]], name: str) -> Any:
    """The handler class's option ``name``, checked; SagaDefinitionError naming the step."""
    try:
        return check_option("", name, getattr(handler, name, None if name != "pivot" else False))
    except (TypeError, ValueError) as exc:
        raise SagaDefinitionError(f"step {handler.__name__!r}: {exc}",
                                  step_name=handler.__name__) from exc


def _resolve(
    handler: type[SagaStepHandler[Any, Any]], overrides: Mapping[str, Any],
    default_retry: Retry | None,
) -> StepOptions:
    values = {
        name: overrides[name] if name in overrides else _option(handler, name)
        for name in ("retry", "timeout", "compensate_timeout")
    }
    if values["retry"] is None and "retry" not in overrides:
        values["retry"] = default_retry
    if not any(value is not None for value in values.values()):
        return NO_OPTIONS
    return StepOptions(**values)


class Saga(Generic[ContextT]):
    """Base class of saga definitions.

    Subclass it with the context type as parameter and list the step handler classes::

        class OrderSaga(Saga[OrderContext]):
            steps = [ReserveInventory, ChargePayment, ShipOrder]

    ``name`` defaults to the class name; storage records it and recovery looks the definition up
    by it, so keep it stable across deployments.

    Forward recovery options (class attributes, all optional): ``retry``, a
    :class:`sagakit.Retry` for every step that sets none; ``deadline``, seconds from the saga's
    start after which, before the pivot, failed steps are no longer retried (the saga
    compensates); ``durable_wait``, the longest wait between two attempts that is slept in the
    process (a longer one is durable: the saga rests WAITING, no process holds it).

    Raises :class:`SagaDefinitionError` at class creation, naming the saga and the step, for a
    non-handler step, a duplicate step, a step whose context type does not accept the saga's,
    an ``act`` or ``compensate`` that is not ``async def``, a step option or saga option of the
    wrong kind or out of range, more than one pivot, a step after the pivot that cannot be
    retried, or a step up to the pivot (every step, without one) that does not implement
    ``compensate``.
    """

    steps: ClassVar[Sequence[Any]] = ()
    name: ClassVar[str] = ""
    context_type: ClassVar[type[Any] | None] = None
    step_specs: ClassVar[tuple[StepSpec, ...]] = ()
    fingerprint: ClassVar[str] = ""
    handler_types: ClassVar[dict[str, type[SagaStepHandler[Any, Any]]]] = {}
    """Every handler class of the saga (fallback alternatives included), by step log name."""
    retry: ClassVar[Retry | None] = None
    deadline: ClassVar[float | None] = None
    durable_wait: ClassVar[float] = 5.0
    pivot_index: ClassVar[int | None] = None
    """The position of the pivot in ``step_specs`` (None: the saga has no pivot)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__ or not cls.__dict__["name"]:
            cls.name = cls.__name__
        _check_stored_name(cls.name, cls.name, None)
        found = _generic_arg(cls, Saga, 0)
        if found is not None:
            cls.context_type = found
        _check_saga_options(cls)
        cls.step_specs = tuple(_validate_steps(cls))
        cls.pivot_index = _check_pivot(cls, cls.step_specs)
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

    async def submit(
        self,
        context: ContextT,
        *,
        storage: SagaStorage,
        queue: str = "default",
        concurrency_key: str | None = None,
        priority: int = 0,
        saga_id: UUID | None = None,
    ) -> SubmittedSaga:
        """Hand this saga to workers: stored PENDING in ``queue`` in one commit; returns its
        handle at once (see :func:`sagakit.submission.submit` for the checks and errors)."""
        from sagakit.submission import submit

        return await submit(self, context, storage=storage, queue=queue,
                            concurrency_key=concurrency_key, priority=priority, saga_id=saga_id)


def definition_fingerprint(specs: Sequence[StepSpec]) -> str:
    """A short hash of the step names in order (fallback alternatives included) and of which
    step is the pivot. A saga without a pivot hashes its names only, as before pivots existed;
    retry policies and timeouts are not part of it (tuning them changes no stored saga's
    meaning)."""
    text = "\n".join("|".join(spec.handler_names()) + ("\x00pivot" if spec.pivot else "")
                     for spec in specs)
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


def _definition_error(cls: type[Saga[Any]], step_name: str | None, text: str) -> SagaDefinitionError:
    where = f"saga {cls.name!r}" + (f": step {step_name!r}" if step_name is not None else "")
    return SagaDefinitionError(f"{where}: {text}", saga_name=cls.name, step_name=step_name)


def _check_saga_options(cls: type[Saga[Any]]) -> None:
    """``retry`` a Retry or None, ``deadline`` seconds > 0 or None, ``durable_wait`` seconds
    >= 0 (kept as floats)."""
    if cls.retry is not None and not isinstance(cls.retry, Retry):
        raise _definition_error(cls, None, f"retry must be a sagakit.Retry or None, got "
                                           f"{cls.retry!r:.80}")
    try:
        cls.deadline = settings.seconds("deadline", cls.deadline, exclusive=True,
                                        allow_none=True)
        cls.durable_wait = settings.seconds("durable_wait", cls.durable_wait)
    except ValueError as exc:
        raise _definition_error(cls, None, str(exc)) from exc


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
        return _in_saga(cls, spec.with_default_retry, cls.retry)
    _check_handler(cls, step, position)
    return _in_saga(cls, StepSpec, step, default_retry=cls.retry)


def _in_saga(cls: type[Saga[Any]], build: Callable[..., StepSpec], *args: Any,
             **kwargs: Any) -> StepSpec:
    """``build(...)``, its SagaDefinitionError (a handler option of the wrong kind or range)
    made to name the saga too."""
    try:
        return build(*args, **kwargs)
    except SagaDefinitionError as exc:
        if exc.saga_name is not None:
            raise
        raise SagaDefinitionError(f"saga {cls.name!r}: {exc.message}", saga_name=cls.name,
                                  step_name=exc.step_name) from exc


def _check_handler(cls: type[Saga[Any]], step: Any, position: int) -> None:
    if not (isinstance(step, type) and issubclass(step, SagaStepHandler)):
        raise SagaDefinitionError(
            f"saga {cls.name!r}: step #{position} ({step!r}) is not a SagaStepHandler subclass",
            step_name=getattr(step, "__name__", repr(step)),
            saga_name=cls.name,
        )
    for method in ("act", "compensate"):
        function = getattr(step, method)
        if method == "compensate" and not implements_compensate(step):
            continue  # whether it must is decided once the pivot is known
        if not (inspect.iscoroutinefunction(function)
                or inspect.iscoroutinefunction(inspect.unwrap(function))):
            raise _definition_error(
                cls, step.__name__, f"{method} must be a coroutine function (async def), "
                                    f"got {function!r:.80}")
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


def _check_pivot(cls: type[Saga[Any]], specs: Sequence[StepSpec]) -> int | None:
    """The pivot's position after checking the taxonomy: at most one pivot, every step after
    it retriable, every step up to it (all, without one) implementing ``compensate``, and so
    does a fallback's primary after it (its cut-off attempt is undone before the alternative
    runs, see :mod:`sagakit.fallback`)."""
    pivots = [index for index, spec in enumerate(specs) if spec.pivot]
    if len(pivots) > 1:
        names = " and ".join(repr(specs[i].name) for i in pivots)
        raise _definition_error(cls, specs[pivots[1]].name,
                                f"steps {names} are both marked pivot: a saga has at most one")
    pivot = pivots[0] if pivots else None
    for index, spec in enumerate(specs):
        if pivot is not None and index > pivot:
            # the handler that fails the step for good: a fallback's alternative
            last = spec.handler_names()[-1]
            retry = spec.options(last).retry
            if retry is None or retry.attempts < 2:
                what = "has no retry policy" if retry is None else "allows a single attempt"
                raise _definition_error(
                    cls, last, f"comes after the pivot {specs[pivot].name!r} and {what}: a "
                               f"step after the pivot is never compensated, it must be "
                               f"retriable (a Retry of 2 attempts or more on the step, in "
                               f"Step(...), or as the saga's retry)")
            if spec.fallback is not None and not implements_compensate(spec.handler):
                raise _definition_error(
                    cls, spec.name, "does not implement compensate, which a fallback's primary "
                                    "must, even after the pivot: an attempt of it cut off by a "
                                    "crash is compensated before its alternative runs")
            continue
        for name in spec.handler_names():
            if not implements_compensate(spec.handler_type(name)):
                where = ("every step of a saga without a pivot" if pivot is None
                         else f"every step up to the pivot {specs[pivot].name!r}")
                raise _definition_error(
                    cls, name, f"does not implement compensate, which {where} must (only "
                               f"steps after a pivot may leave it out)")
    return pivot


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
