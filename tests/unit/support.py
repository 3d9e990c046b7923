"""Shared helpers for the unit tests: a scripted set of step handlers and storage probes.

Every step handler here records each call in a :class:`Script` and can be told to raise (an
``Exception``, a :class:`Crash` standing for a process crash, or anything else) on given calls.
Handlers are built by ``script.container`` so every saga run sees the same script.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from sagakit import (
    MemorySagaStorage,
    Saga,
    SagaContext,
    SagaLogEntry,
    SagaState,
    SagaStepHandler,
)


class Crash(BaseException):
    """Stands for the process dying in the middle of a step (not an Exception: no compensation)."""


@dataclasses.dataclass
class Ctx(SagaContext):
    order_id: str = "order-1"
    trail: list[str] = dataclasses.field(default_factory=list)


Hook = Callable[["StepHandler", Any], Awaitable[None]]


class Script:
    """What the steps do, and a record of what they did.

    ``calls`` lists ``(step_name, action)`` in call order. ``fail(step, action, *errors)`` makes the
    next calls of that step/action raise those errors in turn (then succeed); ``always`` makes every
    call raise. ``hook(step, action, fn)`` awaits ``fn(handler, context)`` at the start of a call.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.instances: list[tuple[str, str, int]] = []
        self._queued: dict[tuple[str, str], deque[BaseException]] = defaultdict(deque)
        self._always: dict[tuple[str, str], BaseException] = {}
        self._hooks: dict[tuple[str, str], Hook] = {}

    def container(self, step_type: type[Any]) -> Any:
        return step_type(self)

    def fail(self, step: str, action: str, *errors: BaseException) -> None:
        self._queued[(step, action)].extend(errors)

    def always(self, step: str, action: str, error: BaseException) -> None:
        self._always[(step, action)] = error

    def heal(self, step: str, action: str) -> None:
        self._always.pop((step, action), None)
        self._queued.pop((step, action), None)

    def hook(self, step: str, action: str, fn: Hook) -> None:
        self._hooks[(step, action)] = fn

    def unhook(self, step: str, action: str) -> None:
        self._hooks.pop((step, action), None)

    def count(self, step: str, action: str) -> int:
        return self.calls.count((step, action))

    def acts(self) -> list[str]:
        return [name for name, action in self.calls if action == "act"]

    def compensations(self) -> list[str]:
        return [name for name, action in self.calls if action == "compensate"]

    async def called(self, handler: StepHandler, action: str, context: Any) -> None:
        name = type(handler).__name__
        self.calls.append((name, action))
        self.instances.append((name, action, id(handler)))
        hook = self._hooks.get((name, action))
        if hook is not None:
            await hook(handler, context)
        queued = self._queued.get((name, action))
        if queued:
            raise queued.popleft()
        error = self._always.get((name, action))
        if error is not None:
            raise error


class StepHandler(SagaStepHandler[Ctx, str]):
    """Appends its name to ``context.trail`` on act, removes it on compensate."""

    def __init__(self, script: Script) -> None:
        self.script = script

    async def act(self, context: Ctx) -> Any:
        await self.script.called(self, "act", context)
        name = type(self).__name__
        context.trail.append(name)
        return self._generate_step_result(f"{name}-done")

    async def compensate(self, context: Ctx) -> None:
        await self.script.called(self, "compensate", context)
        name = type(self).__name__
        if name in context.trail:
            context.trail.remove(name)


class StepA(StepHandler):
    pass


class StepB(StepHandler):
    pass


class StepC(StepHandler):
    pass


class StepD(StepHandler):
    pass


class ThreeStepSaga(Saga[Ctx]):
    steps = [StepA, StepB, StepC]


class FourStepSaga(Saga[Ctx]):
    steps = [StepA, StepB, StepC, StepD]


class OneStepSaga(Saga[Ctx]):
    steps = [StepA]


def transaction(
    saga: Saga[Any],
    script: Script,
    storage: MemorySagaStorage,
    context: Any = None,
    **options: Any,
) -> Any:
    """``saga.transaction`` with the script's container, no real sleeps by default."""
    options.setdefault("compensation_retry_delay", 0.0)
    return saga.transaction(
        context=context if context is not None else Ctx(),
        container=script.container,
        storage=storage,
        **options,
    )


async def drive(txn: Any, into: list[Any] | None = None) -> list[Any]:
    """Iterate a transaction to its end inside ``async with``; return the yielded results (also
    appended to ``into`` as they come, for callers that expect an exception)."""
    results = into if into is not None else []
    async with txn:
        async for result in txn:
            results.append(result)
    return results


async def collect(stream: Any, into: list[Any]) -> None:
    """Append each result's step name from an async iterator (e.g. ``mediator.stream``)."""
    async for result in stream:
        into.append(result.step_name)


async def until(condition: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Wait until ``await condition()`` is true (polling; AssertionError after ``within``
    seconds: a liveness bound, never a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await condition():
        assert loop.time() < deadline, "the condition never came true"
        await asyncio.sleep(0.01)


async def state(storage: MemorySagaStorage, saga_id: UUID) -> SagaState:
    return await storage.get_saga(saga_id)


async def history(storage: MemorySagaStorage, saga_id: UUID) -> list[tuple[str, str, str]]:
    entries: list[SagaLogEntry] = await storage.get_step_history(saga_id)
    return [(e.step_name, e.action.value, e.status.value) for e in entries]


class Gate:
    """Lets a test hold a step open: ``entered`` is set when the step starts, the step waits
    for ``release``."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, handler: Any, context: Any) -> None:
        self.entered.set()
        await self.release.wait()


class Snapshots:
    """A hook that records the stored saga (status, version, log) at the moment a step starts."""

    def __init__(self, storage: MemorySagaStorage, saga_id: UUID) -> None:
        self.storage = storage
        self.saga_id = saga_id
        self.taken: list[tuple[str, int, list[tuple[str, str, str]]]] = []

    async def __call__(self, handler: Any, context: Any) -> None:
        row = await self.storage.get_saga(self.saga_id)
        log = await history(self.storage, self.saga_id)
        self.taken.append((row.status.value, row.version, log))
