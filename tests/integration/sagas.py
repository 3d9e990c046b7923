"""Small sagas shared by the integration tests. Steps record what ran in ``calls``."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from sagakit import Saga, SagaContext, SagaStepHandler


@dataclasses.dataclass
class OrderContext(SagaContext):
    order_id: str
    amount: int = 10
    done: list[str] = dataclasses.field(default_factory=list)


class Recorder:
    """Shared call log plus an optional hook run inside a named step's act."""

    calls: ClassVar[list[str]] = []
    hooks: ClassVar[dict[str, Callable[[], Awaitable[Any]]]] = {}
    undo_hooks: ClassVar[dict[str, Callable[[], Awaitable[Any]]]] = {}
    fail: ClassVar[set[str]] = set()

    @classmethod
    def reset(cls) -> None:
        cls.calls = []
        cls.hooks = {}
        cls.undo_hooks = {}
        cls.fail = set()


class _Step(SagaStepHandler[OrderContext, str]):
    async def act(self, context: OrderContext) -> str:
        name = type(self).__name__
        Recorder.calls.append(f"act:{name}")
        hook = Recorder.hooks.get(name)
        if hook is not None:
            await hook()
        if name in Recorder.fail:
            raise RuntimeError(f"{name} failed")
        context.done.append(name)
        return name

    async def compensate(self, context: OrderContext) -> None:
        name = type(self).__name__
        Recorder.calls.append(f"compensate:{name}")
        hook = Recorder.undo_hooks.get(name)
        if hook is not None:
            await hook()
        context.done.remove(name)


class Reserve(_Step):
    pass


class Charge(_Step):
    pass


class Ship(_Step):
    pass


class Notify(_Step):
    pass


class Invoice(_Step):
    pass


class OrderSaga(Saga[OrderContext]):
    steps = [Reserve, Charge, Ship, Notify, Invoice]
