"""Middleware: code that wraps every step invocation, act and compensate alike.

A middleware is any callable ``async (invocation, call_next) -> result``; it must return what
``call_next(invocation)`` returned (or raise). The first middleware in the list is the outermost.
Each compensation retry is its own invocation (``invocation.attempt`` counts from 1).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from sagakit.invocation import StepInvocation

__all__ = ["CallNext", "LoggingMiddleware", "Middleware", "build_chain"]

CallNext = Callable[[StepInvocation], Awaitable[Any]]


class Middleware(Protocol):
    async def __call__(self, invocation: StepInvocation, call_next: CallNext) -> Any: ...


def build_chain(middlewares: Sequence[Middleware], final: CallNext) -> CallNext:
    """Compose middlewares around ``final``; the first one runs outermost."""
    call: CallNext = final
    for middleware in reversed(middlewares):
        call = functools.partial(middleware, call_next=call)
    return call


class LoggingMiddleware:
    """Logs each invocation's start, end and failure with the saga id, saga name and step.

    Records carry ``saga_id``, ``saga_name``, ``step_name``, ``action`` and ``attempt`` as
    ``extra`` attributes, so structured log handlers can index them.
    """

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO) -> None:
        self.logger = logger or logging.getLogger("sagakit.steps")
        self.level = level

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
