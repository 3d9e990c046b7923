"""Context codecs: dataclass, pydantic and dict contexts, their JSON form and their errors."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import uuid
from typing import Any

import orjson
import pydantic
import pytest

from sagakit import (
    MemorySagaStorage,
    Saga,
    SagaContext,
    SagaError,
    SagaSerializationError,
    SagaStatus,
    SagaStepHandler,
    recover_saga,
)
from sagakit.context import codec_for
from tests.unit.support import Crash, Ctx, Script, ThreeStepSaga, drive, state, transaction


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class Line:
    sku: str
    price: decimal.Decimal
    color: Color = Color.RED


@dataclasses.dataclass
class RichContext(SagaContext):
    orderId: uuid.UUID
    placed_at: dt.datetime
    ship_on: dt.date
    total: decimal.Decimal
    color: Color
    lines: list[Line]
    note: str | None = None
    gift: Line | None = None


def rich() -> RichContext:
    return RichContext(
        orderId=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        placed_at=dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC),
        ship_on=dt.date(2024, 5, 8),
        total=decimal.Decimal("19.90"),
        color=Color.BLUE,
        lines=[Line("a", decimal.Decimal("9.95")), Line("b", decimal.Decimal("9.95"), Color.BLUE)],
        gift=Line("g", decimal.Decimal("0")),
    )


class ModelLine(pydantic.BaseModel):
    sku: str
    price: decimal.Decimal


class ModelContext(pydantic.BaseModel):
    order_id: uuid.UUID = pydantic.Field(alias="orderRef")
    placed_at: dt.datetime
    total: decimal.Decimal
    color: Color
    lines: list[ModelLine] = []
    note: str | None = None


def model() -> ModelContext:
    return ModelContext(
        orderRef=uuid.uuid4(), placed_at=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        total=decimal.Decimal("5.00"), color=Color.RED, lines=[ModelLine(sku="x", price=5)],
    )


# -- dataclass contexts ----------------------------------------------------------------------------


def test_dataclass_context_round_trips_rich_values():
    context = rich()
    data = context.to_dict()
    assert RichContext.from_dict(data) == context
    restored = RichContext.from_dict(orjson.loads(orjson.dumps(data)))
    assert restored == context
    assert isinstance(restored.orderId, uuid.UUID)
    assert isinstance(restored.lines[0], Line)
    assert restored.lines[1].color is Color.BLUE


def test_dataclass_context_is_stored_as_json_with_field_names_as_written():
    data = rich().to_dict()
    assert list(data) == [
        "orderId", "placed_at", "ship_on", "total", "color", "lines", "note", "gift",
    ]
    assert data["orderId"] == "12345678-1234-5678-1234-567812345678"
    assert data["total"] == "19.90"
    assert data["color"] == "blue"
    assert data["ship_on"] == "2024-05-08"
    assert data["note"] is None
    assert data["lines"][0] == {"sku": "a", "price": "9.95", "color": "red"}
    assert orjson.loads(orjson.dumps(data)) == data


def test_copy_is_independent():
    context = rich()
    copy = codec_for(RichContext).copy(context)
    copy.lines.append(Line("c", decimal.Decimal(1)))
    assert len(context.lines) == 2


def test_unserialisable_dataclass_field_is_named_by_path():
    context = rich()
    context.lines[1].price = object()  # type: ignore[assignment]
    with pytest.raises(SagaSerializationError) as caught:
        context.to_dict()
    assert caught.value.field == "lines[1].price"
    assert "lines[1].price" in str(caught.value)
    assert isinstance(caught.value, SagaError)


def test_non_finite_float_is_refused():
    @dataclasses.dataclass
    class FloatContext(SagaContext):
        amount: float

    with pytest.raises(SagaSerializationError) as caught:
        FloatContext(float("inf")).to_dict()
    assert caught.value.field == "amount"


def test_stored_data_that_does_not_fit_raises_serialization_error():
    with pytest.raises(SagaSerializationError):
        RichContext.from_dict({"orderId": "not-a-uuid"})


def test_unsupported_context_type_is_refused():
    class Plain:
        pass

    with pytest.raises(SagaSerializationError, match="unsupported context type"):
        codec_for(Plain)


def test_encoding_a_context_of_the_wrong_type_is_refused():
    with pytest.raises(SagaSerializationError, match="expected a Ctx"):
        codec_for(Ctx).encode({"order_id": "x"})


# -- pydantic contexts -----------------------------------------------------------------------------


def test_pydantic_context_round_trips_and_ignores_aliases():
    context = model()
    data = codec_for(ModelContext).encode(context)
    assert "order_id" in data
    assert "orderRef" not in data
    assert data["total"] == "5.00"
    assert data["color"] == "red"
    restored = codec_for(ModelContext).decode(orjson.loads(orjson.dumps(data)))
    assert restored == context
    assert isinstance(restored.lines[0], ModelLine)


def test_unserialisable_pydantic_field_is_named():
    class Loose(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
        ok: int
        thing: object

    with pytest.raises(SagaSerializationError) as caught:
        codec_for(Loose).encode(Loose(ok=1, thing=object()))
    assert caught.value.field == "thing"


# -- dict contexts ---------------------------------------------------------------------------------


def test_dict_context_round_trips_as_an_independent_copy():
    context: dict[str, Any] = {"order": "o-1", "items": [{"sku": "a", "qty": 2}], "paid": False}
    data = codec_for(dict).encode(context)
    assert data == context
    data["items"].append({"sku": "b"})
    assert len(context["items"]) == 1
    assert codec_for(dict).decode(data) == data


@pytest.mark.parametrize(
    ("context", "field"),
    [
        ({"a": {"b": {1, 2}}}, "a.b"),
        ({"a": [1, object()]}, "a[1]"),
        ({"a": float("nan")}, "a"),
        ({"a": {1: "x"}}, "a[1]"),
    ],
)
def test_dict_context_with_non_json_values_is_refused(context, field):
    with pytest.raises(SagaSerializationError) as caught:
        codec_for(dict).encode(context)
    assert caught.value.field == field


# -- contexts inside sagas -------------------------------------------------------------------------


async def test_an_unserialisable_context_is_refused_before_anything_is_written():
    storage, script = MemorySagaStorage(), Script()
    context = Ctx()
    context.trail.append(object())  # type: ignore[arg-type]
    with pytest.raises(SagaSerializationError) as caught:
        transaction(ThreeStepSaga(), script, storage, context)
    assert caught.value.field == "trail[0]"
    assert caught.value.saga_name == "ThreeStepSaga"
    assert await storage.list_sagas() == []
    assert script.calls == []


async def test_a_step_leaving_the_context_unserialisable_fails_like_a_raising_step():
    storage, script, saga_id = MemorySagaStorage(), Script(), uuid.uuid4()

    async def spoil(handler, context):
        context.trail.append(object())

    script.hook("StepB", "act", spoil)
    with pytest.raises(SagaSerializationError) as caught:
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    assert caught.value.step_name == "StepB"
    assert caught.value.field is not None
    assert "trail" in caught.value.field
    assert script.compensations() == ["StepA"]
    assert "StepC" not in script.acts()
    row = await state(storage, saga_id)
    assert row.status is SagaStatus.FAILED
    assert row.context["trail"] == ["StepA"]  # the last good context


class SetTotal(SagaStepHandler[ModelContext, None]):
    async def act(self, context: ModelContext) -> None:
        context.total += decimal.Decimal("1.25")
        context.note = "charged"

    async def compensate(self, context: ModelContext) -> None:
        context.note = "refunded"


class ModelSaga(Saga[ModelContext]):
    steps = [SetTotal]


async def test_pydantic_context_is_checkpointed():
    storage, saga_id = MemorySagaStorage(), uuid.uuid4()
    context = model()
    await drive(ModelSaga().transaction(context=context, storage=storage, saga_id=saga_id))
    stored = (await state(storage, saga_id)).context
    assert stored["total"] == "6.25"
    assert stored["note"] == "charged"
    assert stored["order_id"] == str(context.order_id)


class DictStep(SagaStepHandler[dict, None]):
    async def act(self, context: dict) -> None:
        context.setdefault("done", []).append(type(self).__name__)

    async def compensate(self, context: dict) -> None:
        context["done"].remove(type(self).__name__)


class DictStepTwo(DictStep):
    pass


class DictSaga(Saga[dict]):
    steps = [DictStep, DictStepTwo]


async def test_dict_context_survives_a_crash_and_recovery():
    storage, saga_id = MemorySagaStorage(), uuid.uuid4()

    class Crashing(DictStepTwo):
        async def act(self, context: dict) -> None:
            raise Crash

    crashing = {DictStepTwo: Crashing()}
    with pytest.raises(Crash):
        await drive(DictSaga().transaction({"order": "o-9"}, crashing, storage, saga_id=saga_id))
    assert (await state(storage, saga_id)).context == {"order": "o-9", "done": ["DictStep"]}
    assert await recover_saga(DictSaga, saga_id, None, None, storage) is SagaStatus.COMPLETED
    assert (await state(storage, saga_id)).context == {
        "order": "o-9", "done": ["DictStep", "DictStepTwo"],
    }


async def test_a_rich_dataclass_context_round_trips_through_a_saga():
    storage, saga_id = MemorySagaStorage(), uuid.uuid4()

    class Touch(SagaStepHandler[RichContext, None]):
        async def act(self, context: RichContext) -> None:
            context.note = "touched"

        async def compensate(self, context: RichContext) -> None:
            pass

    class RichSaga(Saga[RichContext]):
        steps = [Touch]

    txn = RichSaga().transaction(context=rich(), storage=storage, saga_id=saga_id)
    await drive(txn)
    stored = (await state(storage, saga_id)).context
    expected = dataclasses.replace(rich(), note="touched")
    assert RichContext.from_dict(stored) == expected




@dataclasses.dataclass
class LooseContext(SagaContext):
    meta: dict[str, Any]
    anything: Any = None


class LooseModel(pydantic.BaseModel):
    meta: dict[str, Any]
    anything: Any = None


@pytest.mark.parametrize("context_type", [LooseContext, LooseModel, dict])
def test_a_decoded_context_shares_no_mutable_value_with_the_stored_data(context_type):
    data = {"meta": {"seen": ["a"]}, "anything": {"nested": [1]}}
    context = codec_for(context_type).decode(data)
    meta = context["meta"] if isinstance(context, dict) else context.meta
    anything = context["anything"] if isinstance(context, dict) else context.anything
    meta["seen"].append("b")
    anything["nested"].append(2)
    assert data == {"meta": {"seen": ["a"]}, "anything": {"nested": [1]}}


class AppendMeta(SagaStepHandler[LooseContext, None]):
    async def act(self, context: LooseContext) -> None:
        context.anything["steps"].append(type(self).__name__)

    async def compensate(self, context: LooseContext) -> None:
        pass


class AppendMetaTwo(AppendMeta):
    pass


class LooseSaga(Saga[LooseContext]):
    steps = [AppendMeta, AppendMetaTwo]


async def test_in_place_changes_to_a_resumed_context_are_checkpointed():
    storage, saga_id = MemorySagaStorage(), uuid.uuid4()

    class Crashing(AppendMetaTwo):
        async def act(self, context: LooseContext) -> None:
            raise Crash

    context = LooseContext(meta={}, anything={"steps": []})
    with pytest.raises(Crash):
        await drive(LooseSaga().transaction(context, {AppendMetaTwo: Crashing()}, storage,
                                            saga_id=saga_id))
    await drive(LooseSaga().transaction(LooseContext({}), None, storage, saga_id=saga_id))
    stored = (await state(storage, saga_id)).context
    assert stored["anything"] == {"steps": ["AppendMeta", "AppendMetaTwo"]}


# -- ContextJSON: the context on its way to a storage --------------------------------------


def test_context_json_is_a_read_only_mapping_of_its_json() -> None:
    from sagakit.records import ContextJSON, context_json

    data = ContextJSON(b'{"a": 1, "b": [1, 2]}')
    assert dict(data) == {"a": 1, "b": [1, 2]}
    assert data["a"] == 1
    assert len(data) == 2
    assert data == {"a": 1, "b": [1, 2]}
    assert data == ContextJSON(b'{"b":[1,2],"a":1}')
    fresh = data.to_dict()
    fresh["a"] = 2
    assert data["a"] == 1  # to_dict() hands out a copy
    assert context_json(data) is data.json  # written as is
    assert orjson.loads(context_json({"x": (1, 2)})) == {"x": [1, 2]}


@pytest.mark.parametrize("kind", ["dataclass", "pydantic", "dict"])
def test_encode_json_is_the_stored_form_and_equal_contexts_give_equal_bytes(kind: str) -> None:
    fixed = model()
    make = {"dataclass": lambda: Ctx(order_id="o-1"),
            "pydantic": lambda: fixed.model_copy(deep=True),
            "dict": lambda: {"order_id": "o-1", "trail": []}}[kind]
    codec: Any = codec_for(type(make()))
    one, two = make(), make()
    assert codec.encode_json(one) == codec.encode_json(two)
    assert orjson.loads(codec.encode_json(one)) == codec.encode(one)
    assert codec.encode(codec.decode(orjson.loads(codec.encode_json(one)))) == codec.encode(one)


async def test_the_storage_receives_the_engines_json_and_does_not_encode_again() -> None:
    from sagakit.records import ContextJSON

    storage = MemorySagaStorage()
    seen: list[Any] = []
    new_run = storage._new_run

    def spying_run() -> Any:
        run = new_run()
        update = run.update_context

        async def update_context(saga_id: Any, context: Any, current_version: Any = None) -> None:
            seen.append(context)
            await update(saga_id, context, current_version)

        run.update_context = update_context  # type: ignore[method-assign]
        return run

    storage._new_run = spying_run  # type: ignore[method-assign]
    saga_id = uuid.uuid4()
    await drive(transaction(ThreeStepSaga(), Script(), storage, saga_id=saga_id))
    assert len(seen) == 3
    assert all(type(c) is ContextJSON for c in seen)
    assert storage._rows[saga_id.int].context is seen[-1].json  # stored without re-encoding


# -- stored keys that do not fit the type ------------------------------------------------------------


@dataclasses.dataclass
class OrderV2(SagaContext):
    order_id: str
    amount_cents: int = 0
    coupon: str | None = None  # added in this version


def test_camel_case_keys_are_an_error_naming_unknown_and_missing_fields():
    with pytest.raises(SagaSerializationError) as raised:
        OrderV2.from_dict({"orderId": "1", "amountCents": 5})
    message = str(raised.value)
    assert "['orderId', 'amountCents']" in message  # unknown keys
    assert "['order_id', 'amount_cents', 'coupon']" in message  # fields missing from the data
    assert "upgrade_context" in message


def test_a_renamed_field_never_resumes_with_its_default():
    # amount_cents had been called "amount" when the saga was stored
    with pytest.raises(SagaSerializationError, match=r"\['amount'\].*\['amount_cents', 'coupon'\]"):
        OrderV2.from_dict({"order_id": "o-1", "amount": 500})


def test_extra_keys_are_an_error_even_when_every_field_is_there():
    with pytest.raises(SagaSerializationError, match=r"stored keys \['legacy'\]"):
        OrderV2.from_dict({"order_id": "o-1", "amount_cents": 1, "coupon": None, "legacy": 1})


def test_a_missing_field_with_a_default_takes_it():
    assert OrderV2.from_dict({"order_id": "o-1", "amount_cents": 3}) == OrderV2("o-1", 3, None)


def test_a_missing_field_without_a_default_is_named():
    with pytest.raises(SagaSerializationError, match=r"fields \['order_id'\] have no default"):
        OrderV2.from_dict({"amount_cents": 3})


def test_unknown_keys_of_a_nested_dataclass_are_named_by_path():
    data = rich().to_dict()
    data["lines"][0]["skuCode"] = data["lines"][0].pop("sku")
    with pytest.raises(SagaSerializationError, match=r"\['lines\[0\]\.skuCode'\].*'lines\[0\]\.sku'"):
        RichContext.from_dict(data)


@dataclasses.dataclass
class Renamed(SagaContext):
    order_id: str
    amount_cents: int = 0

    @classmethod
    def upgrade_context(cls, data: dict[str, Any]) -> dict[str, Any]:
        if "orderId" in data:  # written by the previous version
            data["order_id"] = data.pop("orderId")
        return data


def test_the_upgrade_hook_renames_a_key_before_decoding():
    assert Renamed.from_dict({"orderId": "o-7", "amount_cents": 2}) == Renamed("o-7", 2)
    assert Renamed.from_dict({"order_id": "o-8"}) == Renamed("o-8", 0)  # current form unchanged
    assert codec_for(Renamed).decode({"orderId": "o-9"}) == Renamed("o-9")


def test_a_failing_or_malformed_upgrade_hook_is_named():
    @dataclasses.dataclass
    class Broken(SagaContext):
        order_id: str = ""

        @classmethod
        def upgrade_context(cls, data: dict[str, Any]) -> Any:
            return data["missing"] if "boom" in data else [data]

    with pytest.raises(SagaSerializationError, match=r"Broken\.upgrade_context failed.*KeyError"):
        Broken.from_dict({"boom": 1})
    with pytest.raises(SagaSerializationError, match="must return a dict, got list"):
        Broken.from_dict({})


class IgnoringModel(pydantic.BaseModel):  # extra="ignore", pydantic's default
    order_id: str
    note: str = ""


class AllowingModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")
    order_id: str


class UpgradedModel(pydantic.BaseModel):
    order_id: str

    @classmethod
    def upgrade_context(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {("order_id" if k == "orderId" else k): v for k, v in data.items()}


def test_a_pydantic_model_that_ignores_extras_still_refuses_unknown_keys():
    codec = codec_for(IgnoringModel)
    with pytest.raises(SagaSerializationError, match=r"\['orderId'\].*\['order_id', 'note'\]"):
        codec.decode({"orderId": "1"})
    with pytest.raises(SagaSerializationError, match="order_id"):
        codec.decode({"note": "n"})
    assert codec.decode({"order_id": "1"}) == IgnoringModel(order_id="1")


def test_a_pydantic_model_that_allows_extras_keeps_them():
    codec = codec_for(AllowingModel)
    decoded = codec.decode({"order_id": "1", "legacy": 2})
    assert decoded.model_extra == {"legacy": 2}
    assert codec.encode(decoded) == {"order_id": "1", "legacy": 2}


def test_a_pydantic_model_may_define_the_upgrade_hook():
    assert codec_for(UpgradedModel).decode({"orderId": "1"}) == UpgradedModel(order_id="1")


class WithComputed(pydantic.BaseModel):
    cents: int

    @pydantic.computed_field  # type: ignore[prop-decorator]
    @property
    def euros(self) -> float:
        return self.cents / 100


def test_a_pydantic_computed_field_in_the_stored_form_is_not_an_unknown_key():
    codec = codec_for(WithComputed)
    assert codec.decode(codec.encode(WithComputed(cents=250))) == WithComputed(cents=250)


def test_dict_contexts_take_any_keys():
    assert codec_for(dict).decode({"orderId": "1"}) == {"orderId": "1"}


async def test_recovery_of_a_context_with_an_unknown_key_runs_and_writes_nothing():
    storage, script, saga_id = MemorySagaStorage(), Script(), uuid.uuid4()
    script.fail("StepB", "act", Crash())
    with pytest.raises(Crash):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    # another deploy's worker stored the context with a field Ctx does not have
    await storage.update_context(saga_id, {"orderId": "o-1", "trail": ["StepA"]})
    before = await state(storage, saga_id)
    logged = await storage.get_step_history(saga_id)

    with pytest.raises(SagaSerializationError) as raised:
        await recover_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage)
    assert "['orderId']" in str(raised.value)
    assert "['order_id']" in str(raised.value)
    assert (raised.value.saga_id, raised.value.saga_name) == (saga_id, "ThreeStepSaga")
    after = await state(storage, saga_id)
    assert (after.status, after.context) == (before.status, before.context)
    assert await storage.get_step_history(saga_id) == logged
    assert script.acts() == ["StepA", "StepB"]  # nothing ran

    with pytest.raises(SagaSerializationError, match="orderId"):  # resuming by id: the same
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    assert script.acts() == ["StepA", "StepB"]
