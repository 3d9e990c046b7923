"""Saga definitions are validated when the class is created."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest

from sagakit import (
    MemorySagaStorage,
    Saga,
    SagaContext,
    SagaDefinitionError,
    SagaError,
    SagaStatus,
    SagaStepHandler,
)
from sagakit.saga import StepSpec
from tests.unit.support import Ctx, StepA, StepB, StepC, ThreeStepSaga


@dataclasses.dataclass
class OtherCtx(SagaContext):
    value: int = 0


@dataclasses.dataclass
class SpecialCtx(Ctx):
    special: bool = True


class OtherStep(SagaStepHandler[OtherCtx, None]):
    async def act(self, context: OtherCtx) -> None:
        pass

    async def compensate(self, context: OtherCtx) -> None:
        pass


class AnyStep(SagaStepHandler[Any, None]):
    async def act(self, context: Any) -> None:
        pass

    async def compensate(self, context: Any) -> None:
        pass


def test_name_defaults_to_the_class_name():
    assert ThreeStepSaga.name == "ThreeStepSaga"
    assert ThreeStepSaga().name == "ThreeStepSaga"


def test_an_explicit_name_is_kept_and_subclasses_get_their_own_default():
    class Named(Saga[Ctx]):
        name = "orders.v1"
        steps = [StepA]

    class Child(ThreeStepSaga):
        pass

    assert Named.name == "orders.v1"
    assert Child.name == "Child"
    assert ThreeStepSaga.name == "ThreeStepSaga"


def test_step_specs_and_context_type_are_derived():
    assert ThreeStepSaga.context_type is Ctx
    assert [spec.name for spec in ThreeStepSaga.step_specs] == ["StepA", "StepB", "StepC"]
    assert all(isinstance(spec, StepSpec) for spec in ThreeStepSaga.step_specs)
    assert [spec.handler for spec in ThreeStepSaga.step_specs] == [StepA, StepB, StepC]


def test_fingerprint_depends_on_the_steps_and_their_order():
    class Same(Saga[Ctx]):
        steps = [StepA, StepB, StepC]

    class Reordered(Saga[Ctx]):
        steps = [StepB, StepA, StepC]

    assert Same.fingerprint == ThreeStepSaga.fingerprint
    assert Reordered.fingerprint != ThreeStepSaga.fingerprint


@pytest.mark.parametrize(
    "bad", [object(), "StepA", int, AnyStep()], ids=["object", "str", "int", "instance"]
)
def test_a_non_handler_step_is_refused(bad):
    with pytest.raises(SagaDefinitionError) as caught:

        class Broken(Saga[Ctx]):
            steps = [StepA, bad]

    error = caught.value
    assert isinstance(error, TypeError)
    assert isinstance(error, SagaError)
    assert error.saga_name == "Broken"
    assert "Broken" in str(error)
    assert "#2" in str(error)


def test_a_duplicate_step_is_refused():
    with pytest.raises(SagaDefinitionError) as caught:

        class Twice(Saga[Ctx]):
            steps = [StepA, StepB, StepA]

    assert caught.value.step_name == "StepA"
    assert caught.value.saga_name == "Twice"
    assert "StepA" in str(caught.value)
    assert "Twice" in str(caught.value)


def test_a_step_for_another_context_type_is_refused():
    with pytest.raises(SagaDefinitionError) as caught:

        class Mixed(Saga[Ctx]):
            steps = [StepA, OtherStep]

    assert caught.value.step_name == "OtherStep"
    assert caught.value.saga_name == "Mixed"
    assert "OtherCtx" in str(caught.value)
    assert "Ctx" in str(caught.value)


def test_a_step_for_a_base_context_type_is_accepted():
    class Special(Saga[SpecialCtx]):
        steps = [StepA, StepB]

    assert Special.context_type is SpecialCtx


def test_a_step_for_a_subclass_context_is_refused_by_a_base_context_saga():
    class SpecialStep(SagaStepHandler[SpecialCtx, None]):
        async def act(self, context: SpecialCtx) -> None:
            pass

        async def compensate(self, context: SpecialCtx) -> None:
            pass

    with pytest.raises(SagaDefinitionError):

        class Narrow(Saga[Ctx]):
            steps = [SpecialStep]


def test_any_context_steps_fit_every_saga():
    class Loose(Saga[OtherCtx]):
        steps = [AnyStep, OtherStep]

    assert [spec.name for spec in Loose.step_specs] == ["AnyStep", "OtherStep"]


def test_a_saga_without_context_parameter_accepts_any_steps():
    class Untyped(Saga):  # type: ignore[type-arg]
        steps = [StepA, OtherStep]

    assert Untyped.context_type is None
    assert len(Untyped.step_specs) == 2


async def test_a_generic_dict_context_is_accepted_and_runs():
    class DictStep(SagaStepHandler[dict[str, Any], None]):
        async def act(self, context: dict[str, Any]) -> None:
            context["acted"] = True

        async def compensate(self, context: dict[str, Any]) -> None:
            pass

    class DictSaga(Saga[dict[str, Any]]):
        steps = [DictStep]

    assert DictSaga.step_specs[0].handler is DictStep
    storage, saga_id = MemorySagaStorage(), uuid.uuid4()
    txn = DictSaga().transaction({"order": "o-1"}, storage=storage, saga_id=saga_id)
    assert await txn.run() is SagaStatus.COMPLETED
    assert (await storage.get_saga(saga_id)).context == {"order": "o-1", "acted": True}


def test_a_handler_without_act_cannot_be_built():
    class Incomplete(SagaStepHandler[Ctx, None]):
        async def compensate(self, context: Ctx) -> None:
            pass

    with pytest.raises(TypeError):
        Incomplete()  # type: ignore[abstract]


async def test_the_inherited_compensate_raises_naming_the_step():
    class ForwardOnly(SagaStepHandler[Ctx, None]):
        async def act(self, context: Ctx) -> None:
            pass

    with pytest.raises(NotImplementedError, match="'ForwardOnly' does not implement compensate"):
        await ForwardOnly().compensate(Ctx())


def test_idempotency_key_outside_a_step_raises():
    with pytest.raises(RuntimeError, match="only available while a step runs"):
        _ = AnyStep().idempotency_key


def test_a_saga_name_no_storage_can_keep_is_refused_at_class_creation() -> None:
    from sagakit import Saga, SagaDefinitionError

    for bad in ("x" * 256, "nul\x00name"):
        with pytest.raises(SagaDefinitionError, match="at most 255 characters"):
            type("Named", (Saga,), {"name": bad, "steps": []})
    assert type("Named", (Saga,), {"name": "y" * 255, "steps": []}).name == "y" * 255


def test_a_step_name_no_storage_can_keep_is_refused_at_class_creation() -> None:
    from sagakit import Saga, SagaDefinitionError, SagaStepHandler

    async def nothing(self: Any, context: Any) -> None:
        pass

    long_step = type("S" * 256, (SagaStepHandler,), {"act": nothing, "compensate": nothing})
    with pytest.raises(SagaDefinitionError, match="at most 255 characters") as raised:
        type("LongSteps", (Saga,), {"steps": [long_step]})
    assert raised.value.step_name == "S" * 256
