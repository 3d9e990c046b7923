"""Middleware: code that wraps every step invocation, act and compensate alike.

A middleware is any callable ``async (invocation, call_next) -> result``; it must return what
``call_next(invocation)`` returned (or raise). The first middleware in the list is the outermost.
Each compensation retry is its own invocation (``invocation.attempt`` counts from 1).

A middleware may also observe whole saga runs: if it has a method
``observe_saga(run: SagaRun) -> async context manager``, the orchestrator enters that context
around each run of a saga (a first run, a resume, a recovery, an abort), so every step
invocation of the run happens inside it. ``run.status`` is the saga's status as last committed;
when the context exits it is the run's final status (RUNNING or COMPENSATING when the run was
interrupted), and ``run.error`` is the step error that made the saga compensate, if any.

Logging: every record of sagakit's loggers carries ``saga_id``, ``saga_name``, ``step_name``,
``action`` and ``attempt`` attributes (None where they do not apply), filled by
:class:`SagaLogFilter` from the step invocation or the saga run in progress.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar
from uuid import UUID

from sagakit.invocation import StepInvocation, current_invocation
from sagakit.records import SagaStatus

__all__ = [
    "SAGAKIT_LOGGERS",
    "CallNext",
    "LoggingMiddleware",
    "Middleware",
    "SagaLogFilter",
    "SagaObserver",
    "SagaRun",
    "build_chain",
    "enter_log_scope",
    "leave_log_scope",
    "log_scope",
    "observe_saga",
    "saga_log_context",
]

CallNext = Callable[[StepInvocation], Awaitable[Any]]
T = TypeVar("T")


class Middleware(Protocol):
    async def __call__(self, invocation: StepInvocation, call_next: CallNext) -> Any: ...


def build_chain(middlewares: Sequence[Middleware], final: CallNext) -> CallNext:
    """Compose middlewares around ``final``; the first one runs outermost."""
    call: CallNext = final
    for middleware in reversed(middlewares):
        call = functools.partial(middleware, call_next=call)
    return call


# -- saga runs ----------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class SagaRun:
    """One run of one saga, as an observer (``observe_saga``) sees it.

    ``mode`` is ``"run"`` (a new saga), ``"resume"`` (a transaction given the id of a stored
    saga), ``"recover"``, or ``"abort"``/``"resume"`` for the explicit recovery calls.
    ``status`` is kept up to date by the orchestrator and is final when the observer's context
    exits; ``error`` is the step error that made the saga compensate in this run (also set when
    recovery swallows that error and returns FAILED).
    """

    saga_id: UUID
    saga_name: str
    mode: str
    status: SagaStatus
    error: BaseException | None = None


class SagaObserver(Protocol):
    """The optional saga-level hook of a middleware."""

    def observe_saga(self, run: SagaRun) -> AbstractAsyncContextManager[Any]: ...


def observe_saga(middlewares: Sequence[Any], run: SagaRun) -> AbstractAsyncContextManager[Any]:
    """Enter the ``observe_saga`` context of each middleware that has one (first outermost)."""
    hooks = [hook for hook in (getattr(m, "observe_saga", None) for m in middlewares)
             if callable(hook)]
    if not hooks:
        return _NOTHING  # the common case costs no generator
    return _observed(hooks, run)


_NOTHING = contextlib.nullcontext()


@contextlib.asynccontextmanager
async def _observed(hooks: list[Any], run: SagaRun) -> AsyncIterator[SagaRun]:
    async with contextlib.AsyncExitStack() as stack:
        for hook in hooks:
            await stack.enter_async_context(hook(run))
        yield run


# -- logging ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _LogScope:
    saga_id: UUID | str
    saga_name: str | None
    step_name: str | None


_log_scope: contextvars.ContextVar[_LogScope | None] = contextvars.ContextVar(
    "sagakit_log_scope", default=None
)

LOG_FIELDS = ("saga_id", "saga_name", "step_name", "action", "attempt")


class saga_log_context:
    """Within this block, records filtered by :class:`SagaLogFilter` name this saga (and step).

    A plain class rather than ``@contextmanager``: it is entered around every step."""

    __slots__ = ("_scope", "_token")

    def __init__(
        self, saga_id: UUID | str, saga_name: str | None = None, step_name: str | None = None
    ) -> None:
        self._scope = _LogScope(saga_id, saga_name, step_name)
        self._token: contextvars.Token[_LogScope | None] | None = None

    def __enter__(self) -> None:
        self._token = _log_scope.set(self._scope)

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _log_scope.reset(self._token)
            self._token = None


def log_scope(saga_id: UUID, saga_name: str) -> _LogScope:
    """A saga's log scope, to enter (and leave) with :func:`enter_log_scope`."""
    return _LogScope(saga_id, saga_name, None)


def enter_log_scope(scope: _LogScope) -> contextvars.Token[_LogScope | None]:
    """Make records filtered by :class:`SagaLogFilter` name this saga until
    :func:`leave_log_scope` (for a generator that drives a saga: it leaves the scope before
    each ``yield``, so the caller's code never runs inside it, and enters it again after)."""
    return _log_scope.set(scope)


def leave_log_scope(token: contextvars.Token[_LogScope | None]) -> None:
    _log_scope.reset(token)


class SagaLogFilter(logging.Filter):
    """Adds ``saga_id``, ``saga_name``, ``step_name``, ``action`` and ``attempt`` to each record
    that does not carry them yet: from the step invocation running (see
    :func:`~sagakit.current_invocation`), else from the saga run in progress, else None.

    sagakit installs one on each of its own loggers (:data:`SAGAKIT_LOGGERS`). Add one to a
    handler to give your own records the same fields — a record logged inside a step's ``act``
    or ``compensate`` then names the saga and the step::

        handler.addFilter(sagakit.SagaLogFilter())
    """

    def filter(self, record: logging.LogRecord) -> bool:
        values: dict[str, Any]
        invocation = current_invocation()
        if invocation is not None:
            values = {
                "saga_id": str(invocation.saga_id),
                "saga_name": invocation.saga_name,
                "step_name": invocation.step_name,
                "action": invocation.action.value,
                "attempt": invocation.attempt,
            }
        else:
            scope = _log_scope.get()
            values = dict.fromkeys(LOG_FIELDS)
            if scope is not None:
                values.update(saga_id=str(scope.saga_id), saga_name=scope.saga_name,
                              step_name=scope.step_name)
        fields = record.__dict__
        for name, value in values.items():
            if name not in fields:
                fields[name] = value
        return True


SAGAKIT_LOGGERS = ("sagakit", "sagakit.cli", "sagakit.steps", "sagakit.storage", "sagakit.worker")
"""The loggers sagakit writes to; each has a :class:`SagaLogFilter`."""

_FILTER = SagaLogFilter()


def _install_filter() -> None:
    for name in SAGAKIT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, SagaLogFilter) for f in logger.filters):
            logger.addFilter(_FILTER)


_install_filter()


class LoggingMiddleware:
    """Logs each invocation's start, end and failure with the saga id, saga name and step — and,
    with ``saga_runs=True``, each saga run's beginning and end (mode, status, error).

    Records carry ``saga_id``, ``saga_name``, ``step_name``, ``action`` and ``attempt`` as
    ``extra`` attributes (the last three are None on a saga run's records), so structured log
    handlers can index them. A failed invocation is logged at WARNING, the rest at ``level``.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        level: int = logging.INFO,
        *,
        saga_runs: bool = False,
    ) -> None:
        self.logger = logger or logging.getLogger("sagakit.steps")
        self.level = level
        self.saga_runs = saga_runs

    async def __call__(self, invocation: StepInvocation, call_next: CallNext) -> Any:
        extra = {
            "saga_id": str(invocation.saga_id),
            "saga_name": invocation.saga_name,
            "step_name": invocation.step_name,
            "action": invocation.action.value,
            "attempt": invocation.attempt,
        }
        where = f"saga {invocation.saga_name} {invocation.saga_id} step {invocation.step_name}"
        self.logger.log(self.level, "%s %s started (attempt %d)", where,
                        invocation.action.value, invocation.attempt, extra=extra)
        began = time.perf_counter()
        try:
            result = await call_next(invocation)
        except Exception as exc:
            self.logger.warning("%s %s failed: %r", where, invocation.action.value, exc, extra=extra)
            raise
        elapsed_ms = (time.perf_counter() - began) * 1000
        self.logger.log(self.level, "%s %s done in %.1f ms", where, invocation.action.value,
                        elapsed_ms, extra=extra)
        return result

    @contextlib.asynccontextmanager
    async def observe_saga(self, run: SagaRun) -> AsyncIterator[None]:
        if not self.saga_runs:
            yield
            return
        extra = {"saga_id": str(run.saga_id), "saga_name": run.saga_name,
                 "step_name": None, "action": None, "attempt": None}
        where = f"saga {run.saga_name} {run.saga_id}"
        self.logger.log(self.level, "%s: %s begins at %s", where, run.mode, run.status.value,
                        extra=extra)
        began = time.perf_counter()
        try:
            yield
        finally:
            elapsed_ms = (time.perf_counter() - began) * 1000
            error = f" ({type(run.error).__name__}: {run.error})" if run.error is not None else ""
            self.logger.log(self.level, "%s: %s ends at %s%s after %.1f ms", where, run.mode,
                            run.status.value, error, elapsed_ms, extra=extra)
