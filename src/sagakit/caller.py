"""Calling a saga's steps: resolving handlers, the middleware chain, the current invocation,
timeouts, and the lease keeper's watch over a step in flight.

:class:`StepCaller` is the part of a run (:class:`~sagakit.execution.Execution`) that makes one
call of a handler's ``act`` or ``compensate``; the run decides which calls to make and writes
the checkpoints.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from sagakit.container import Container
from sagakit.exceptions import StepTimeoutError
from sagakit.invocation import (
    StepInvocation,
    _current,
    current_invocation,
    reset_current,
    set_current,
)
from sagakit.lease import LeaseKeeper, running_task
from sagakit.middleware import Middleware, build_chain
from sagakit.records import SagaAction
from sagakit.saga import Saga, StepOptions
from sagakit.step import SagaStepHandler

__all__ = ["StepCaller"]


class StepCaller:
    """Makes the step calls of one run of one saga. ``keeper`` is the run's lease keeper while
    steps may run (None otherwise); ``act_options`` the saga's handlers whose act retries or
    times out, ``undo_timeouts`` those whose compensation times out (computed once per saga
    class: a plain step costs a dict lookup)."""

    __slots__ = ("act_options", "chain", "container", "fencing_token", "handlers", "keeper",
                 "saga_id", "saga_name", "types", "undo_timeouts")

    def __init__(self, saga: Saga[Any], saga_id: UUID, container: Container,
                 middlewares: Sequence[Middleware], fencing_token: int) -> None:
        self.saga_id = saga_id
        self.saga_name = saga.name
        self.container = container
        self.fencing_token = fencing_token
        """The run's fencing token, given to every step (see StepInvocation)."""
        self.types = saga.handler_types
        self.handlers: dict[str, SagaStepHandler[Any, Any]] = {}
        self.chain = build_chain(middlewares, _invoke)
        self.keeper: LeaseKeeper | None = None
        self.act_options, self.undo_timeouts = _options_of(type(saga))

    async def handler(self, handler_name: str) -> SagaStepHandler[Any, Any]:
        handler = self.handlers.get(handler_name)
        if handler is None:
            handler = await self.container.resolve(self.types[handler_name])
            self.handlers[handler_name] = handler
        return handler


    async def call(self, invocation: StepInvocation) -> Any:
        """Call the step through the middleware chain, as the current invocation (which is
        also the log scope of whatever the middlewares and the step log, see SagaLogFilter).

        The lease keeper watches the call (``step_task``): a step it cut off, its lease lost
        or possibly run out, raises SagaLeaseLostError instead of whatever it raised or
        returned; a cancellation from outside stays a cancellation."""
        token = _current.set(invocation)
        keeper = self.keeper
        if keeper is not None:
            keeper.step_task = running_task(keeper.loop)
        try:
            if self.chain is not _invoke:
                out = await self.chain(invocation)
            # No middleware: what _invoke would do, one coroutine frame less per step.
            elif invocation.action is SagaAction.ACT:
                out = await invocation.handler.act(invocation.context)
            else:
                out = await invocation.handler.compensate(invocation.context)
        except BaseException:
            if keeper is not None:
                keeper.step_task = None
                if keeper.cut_off is not None and (lost := keeper.step_cut_off(invocation)):
                    raise lost  # noqa: B904 (its cause is the lease's loss; its context, this)
            raise
        finally:
            _current.reset(token)
        if keeper is not None:
            keeper.step_task = None
            if keeper.cut_off is not None and (lost := keeper.step_cut_off(invocation)):
                raise lost
        return out

    async def timed(self, invocation: StepInvocation, limit: float) -> Any:
        """``_call`` within ``limit`` seconds: the call is cancelled past it and
        StepTimeoutError raised (a TimeoutError the step raises itself stays its own)."""
        try:
            async with asyncio.timeout(limit) as scope:
                return await self.call(invocation)
        except TimeoutError as exc:
            if not scope.expired():
                raise
            raise StepTimeoutError.expired(
                limit, action=invocation.action.value, saga_id=self.saga_id,
                step_name=invocation.step_name, saga_name=self.saga_name,
            ) from exc


_OPTIONS: dict[type[Any], tuple[dict[str, StepOptions], dict[str, float]]] = {}


def _options_of(saga: type[Saga[Any]]) -> tuple[dict[str, StepOptions], dict[str, float]]:
    """A saga class's handlers that retry or time out their act (by name, with their options)
    and their compensation timeouts: computed once per class, so a plain step costs a dict
    lookup."""
    found = _OPTIONS.get(saga)
    if found is None:
        acts: dict[str, StepOptions] = {}
        undos: dict[str, float] = {}
        for spec in saga.step_specs:
            for name in spec.handler_names():
                options = spec.options(name)
                if options.retry is not None or options.timeout is not None:
                    acts[name] = options
                if options.compensate_timeout is not None:
                    undos[name] = options.compensate_timeout
        found = _OPTIONS[saga] = (acts, undos)
    return found


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
