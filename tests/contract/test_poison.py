"""Values no storage keeps: U+0000 in a context is refused before it is written (set by a step,
it fails that step, which is compensated), and log texts are kept whatever they hold."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from sagakit import SagaSerializationError, SagaStatus
from sagakit.records import SagaStepStatus
from tests.integration.sagas import OrderContext, OrderSaga, Recorder


@pytest.fixture(autouse=True)
def _reset_recorder() -> None:
    Recorder.reset()


async def test_a_nul_character_set_by_a_step_fails_it_on_every_storage(storage: Any) -> None:
    ctx = OrderContext("fine")

    async def nul() -> None:
        ctx.order_id = "bad\x00value"

    Recorder.hooks["Charge"] = nul
    saga_id = uuid.uuid4()
    with pytest.raises(SagaSerializationError) as info:
        await OrderSaga().transaction(context=ctx, storage=storage, saga_id=saga_id,
                                      compensation_retry_delay=0).run()
    assert info.value.step_name == "Charge"
    assert "U+0000" in str(info.value)
    state = await storage.get_saga(saga_id)
    assert state.status is SagaStatus.FAILED
    assert state.context["order_id"] == "fine"
    assert Recorder.calls == ["act:Reserve", "act:Charge", "compensate:Reserve"]


async def test_a_nul_character_in_the_first_context_is_refused_before_anything_is_written(
    storage: Any,
) -> None:
    saga_id = uuid.uuid4()
    with pytest.raises(SagaSerializationError) as info:
        await OrderSaga().transaction(context=OrderContext("a\x00b"), storage=storage,
                                      saga_id=saga_id).run()
    assert (info.value.saga_id, info.value.saga_name) == (saga_id, "OrderSaga")
    assert Recorder.calls == []
    assert await storage.list_sagas() == []


async def test_a_backslash_before_u0000_is_no_nul(storage: Any) -> None:
    text = "a\\u0000b"  # a backslash and the letters u0000, no NUL character
    status = await OrderSaga().transaction(context=OrderContext(text), storage=storage).run()
    assert status is SagaStatus.COMPLETED
    (state,) = await storage.list_sagas()
    assert state.context["order_id"] == text


async def test_an_error_message_with_nul_and_of_any_length_is_logged(storage: Any) -> None:
    class Loud(Exception):
        pass

    async def fail() -> None:
        raise Loud("nul \x00 here " + "x" * 100_000)

    Recorder.hooks["Charge"] = fail
    saga_id = uuid.uuid4()
    with pytest.raises(Loud):
        await OrderSaga().transaction(context=OrderContext("l"), storage=storage,
                                      saga_id=saga_id, compensation_retry_delay=0).run()
    assert (await storage.get_saga(saga_id)).status is SagaStatus.FAILED
    (failed,) = [e for e in await storage.get_step_history(saga_id)
                 if e.status is SagaStepStatus.FAILED]
    assert failed.details is not None
    assert "nul \\x00 here" in failed.details
    assert len(failed.details) <= 8000


async def test_a_compensation_that_leaves_an_unstorable_context_is_still_recorded(
    storage: Any,
) -> None:
    ctx = OrderContext("fine")

    async def scribble() -> None:  # inside Charge's compensation
        ctx.order_id = "undone\x00"

    Recorder.fail.add("Ship")
    Recorder.undo_hooks["Charge"] = scribble
    saga_id = uuid.uuid4()
    with pytest.raises(RuntimeError, match="Ship failed"):
        await OrderSaga().transaction(context=ctx, storage=storage, saga_id=saga_id,
                                      compensation_retry_delay=0).run()
    state = await storage.get_saga(saga_id)
    assert state.status is SagaStatus.FAILED  # every compensation recorded all the same
    assert state.context["order_id"] == "fine"  # the last context the storage accepted
    history = await storage.get_step_history(saga_id)
    assert [(e.step_name, e.status) for e in history if e.action.value == "compensate"] == [
        ("Charge", SagaStepStatus.COMPENSATED), ("Reserve", SagaStepStatus.COMPENSATED)]
