"""SagaMap, bootstrap and the mediator's stream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from typing import Any

import pytest

import sagakit
from sagakit import MemorySagaStorage, Saga, SagaMap, SagaMediator, SagaStatus, StepInvocation
from tests.unit.support import (
    Crash,
    Ctx,
    OneStepSaga,
    Script,
    StepA,
    ThreeStepSaga,
    collect,
    state,
)


@dataclasses.dataclass
class SubCtx(Ctx):
    extra: int = 0


@dataclasses.dataclass
class OtherCtx(sagakit.SagaContext):
    value: int = 0


def mapper(saga_map: SagaMap) -> None:
    saga_map.bind(Ctx, ThreeStepSaga)


# -- SagaMap ---------------------------------------------------------------------------------------


def test_saga_for_finds_the_bound_saga_and_subclasses():
    saga_map = SagaMap()
    saga_map.bind(Ctx, ThreeStepSaga)
    assert saga_map.saga_for(Ctx()) is ThreeStepSaga
    assert saga_map.saga_for(SubCtx()) is ThreeStepSaga
    assert saga_map.saga_named("ThreeStepSaga") is ThreeStepSaga
    assert list(saga_map) == [ThreeStepSaga]


def test_the_nearest_bound_type_wins():
    class SubSaga(Saga[SubCtx]):
        steps = [StepA]

    saga_map = SagaMap()
    saga_map.bind(Ctx, ThreeStepSaga)
    saga_map.bind(SubCtx, SubSaga)
    assert saga_map.saga_for(SubCtx()) is SubSaga
    assert saga_map.saga_for(Ctx()) is ThreeStepSaga


def test_unbound_lookups_raise_lookup_error():
    saga_map = SagaMap()
    saga_map.bind(Ctx, ThreeStepSaga)
    with pytest.raises(LookupError, match="OtherCtx"):
        saga_map.saga_for(OtherCtx())
    with pytest.raises(LookupError, match="Nope"):
        saga_map.saga_named("Nope")


def test_binding_a_type_or_name_to_another_saga_is_refused():
    saga_map = SagaMap()
    saga_map.bind(Ctx, ThreeStepSaga)
    saga_map.bind(Ctx, ThreeStepSaga)  # the same binding again is fine
    with pytest.raises(ValueError, match="already bound"):
        saga_map.bind(Ctx, OneStepSaga)

    class Impostor(Saga[OtherCtx]):
        name = "ThreeStepSaga"
        steps = []

    with pytest.raises(ValueError, match="already bound"):
        saga_map.bind(OtherCtx, Impostor)


# -- bootstrap -------------------------------------------------------------------------------------


def test_bootstrap_is_reachable_the_seed_way():
    from sagakit import bootstrap

    mediator = bootstrap.bootstrap(sagas_mapper=mapper)
    assert isinstance(mediator, SagaMediator)
    assert mediator.saga_map.saga_for(Ctx()) is ThreeStepSaga
    assert isinstance(mediator.storage, MemorySagaStorage)


def test_bootstrap_accepts_a_ready_saga_map():
    saga_map = SagaMap()
    mapper(saga_map)
    mediator = sagakit.bootstrap(sagas_mapper=saga_map)
    assert mediator.saga_map is saga_map


async def test_stream_runs_the_bound_saga_and_yields_each_step():
    script, storage = Script(), MemorySagaStorage()
    mediator = sagakit.bootstrap(
        di_container=script.container, sagas_mapper=mapper, saga_storage=storage
    )
    saga_id = uuid.uuid4()
    names = [r.step_type.__name__ async for r in mediator.stream(Ctx("o-7"), saga_id=saga_id)]
    assert names == ["StepA", "StepB", "StepC"]
    row = await state(storage, saga_id)
    assert row.status is SagaStatus.COMPLETED
    assert row.context["order_id"] == "o-7"


async def test_stream_reraises_after_compensation():
    script, storage = Script(), MemorySagaStorage()
    script.fail("StepB", "act", RuntimeError("no stock"))
    mediator = sagakit.bootstrap(
        di_container=script.container, sagas_mapper=mapper, saga_storage=storage,
        compensation_retry_delay=0,
    )
    seen: list[str] = []
    with pytest.raises(RuntimeError, match="no stock"):
        await collect(mediator.stream(Ctx()), seen)
    assert seen == ["StepA"]
    assert script.compensations() == ["StepA"]


async def test_bootstrap_options_and_middlewares_reach_every_run():
    script = Script()
    script.fail("StepB", "act", RuntimeError("boom"))
    script.always("StepA", "compensate", RuntimeError("down"))
    actions: list[tuple[str, str, int]] = []

    async def spy(invocation: StepInvocation, call_next: Any) -> Any:
        actions.append((invocation.step_name, invocation.action.value, invocation.attempt))
        return await call_next(invocation)

    mediator = sagakit.bootstrap(
        di_container=script.container, sagas_mapper=mapper, middlewares=[spy],
        compensation_retry_count=2, compensation_retry_delay=0,
    )
    with pytest.raises(RuntimeError, match="boom"):
        async for _ in mediator.stream(Ctx()):
            pass
    assert actions == [
        ("StepA", "act", 1), ("StepB", "act", 1),
        ("StepA", "compensate", 1), ("StepA", "compensate", 2),
    ]


async def test_a_closed_stream_leaves_the_saga_resumable_and_recover_finishes_it():
    script, storage = Script(), MemorySagaStorage()
    mediator = sagakit.bootstrap(
        di_container=script.container, sagas_mapper=mapper, saga_storage=storage
    )
    saga_id = uuid.uuid4()
    async with contextlib.aclosing(mediator.stream(Ctx(), saga_id=saga_id)) as stream:
        async for _ in stream:
            break
    row = await state(storage, saga_id)
    assert (row.status, row.lease_owner) == (SagaStatus.RUNNING, None)
    assert await mediator.recover(saga_id) is SagaStatus.COMPLETED
    assert script.acts() == ["StepA", "StepB", "StepC"]


async def test_mediator_recover_finds_the_saga_by_its_stored_name():
    script, storage = Script(), MemorySagaStorage()
    script.fail("StepB", "act", Crash())
    mediator = sagakit.bootstrap(
        di_container=script.container, sagas_mapper=mapper, saga_storage=storage
    )
    saga_id = uuid.uuid4()
    with pytest.raises(Crash):
        async for _ in mediator.stream(Ctx(), saga_id=saga_id):
            pass
    assert await mediator.recover(saga_id) is SagaStatus.COMPLETED
    assert script.acts() == ["StepA", "StepB", "StepB", "StepC"]


async def test_stream_of_an_unbound_context_raises_lookup_error():
    mediator = sagakit.bootstrap(sagas_mapper=mapper)
    with pytest.raises(LookupError):
        async for _ in mediator.stream(OtherCtx()):
            pass




async def test_mediator_recover_uses_the_bootstrap_options(monkeypatch):
    async def no_sleep(delay: float, result: object = None) -> object:
        return result

    monkeypatch.setattr(asyncio, "sleep", no_sleep)
    script, storage = Script(), MemorySagaStorage()
    script.fail("StepC", "act", RuntimeError("boom"))
    script.always("StepA", "compensate", RuntimeError("down"))
    mediator = sagakit.bootstrap(
        di_container=script.container, sagas_mapper=mapper, saga_storage=storage,
        compensation_retry_count=1, max_recovery_attempts=1,
    )
    saga_id = uuid.uuid4()
    with pytest.raises(RuntimeError, match="boom"):
        await collect(mediator.stream(Ctx(), saga_id=saga_id), [])
    assert script.count("StepA", "compensate") == 1
    assert await mediator.recover(saga_id) is SagaStatus.COMPENSATING
    assert script.count("StepA", "compensate") == 2  # one attempt per run, as configured
    assert await mediator.recover(saga_id) is SagaStatus.PARKED
    assert script.count("StepA", "compensate") == 2
