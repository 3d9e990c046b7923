"""Contract: contexts are stored as JSON — they round-trip exactly, and a context that is not JSON
is refused with SagaSerializationError before anything is written."""

from __future__ import annotations

from typing import Any

import pytest

from sagakit.exceptions import SagaError, SagaNotFoundError, SagaSerializationError
from sagakit.records import SagaStatus
from tests.contract.support import (
    LONG_LEASE,
    NAME,
    assert_writes_nothing,
    buffer_checkpoint,
    create,
    new_id,
    snapshot,
)

NESTED: dict[str, Any] = {
    "unicode": "héllo wörld — 日本語 🎉",
    "escapes": 'quote " backslash \\ newline \n tab \t',
    "ключ": "non-ASCII key",
    "int64_max": 2**63 - 1,
    "int64_min": -(2**63),
    "beyond_double_precision": 2**53 + 1,
    "zero": 0,
    "floats": [0.1, -2.5, 1e-7, 1e300, 3.141592653589793],
    "null": None,
    "bools": [True, False],
    "empty": {"list": [], "dict": {}, "string": ""},
    "nested": {"a": [{"b": [1, [2, [3, None]]]}, {"c": {"d": "e", "f": [{"g": 1.5}]}}]},
}

CONTEXTS = [
    pytest.param(NESTED, id="nested"),
    pytest.param({}, id="empty"),
    pytest.param({"list": list(range(200)), "text": "x" * 10_000}, id="large"),
]

NOT_JSON = [
    pytest.param({"tags": {1, 2}}, id="set"),
    pytest.param({"nested": {"deep": [object()]}}, id="object"),
]


def assert_same_json(loaded: dict[str, Any], expected: dict[str, Any]) -> None:
    """Equal, and ints stay ints (a float 9007199254740993.0 would compare unequal anyway)."""
    assert loaded == expected
    if "beyond_double_precision" in expected:
        assert type(loaded["beyond_double_precision"]) is int
        assert type(loaded["floats"][1]) is float


@pytest.mark.parametrize("context", CONTEXTS)
async def test_context_round_trips_through_create_and_update(
    storage: Any, context: dict[str, Any]
) -> None:
    saga_id = await create(storage, context)
    _, loaded, _ = await storage.load_saga_state(saga_id)
    assert_same_json(loaded, context)
    assert_same_json((await storage.get_saga(saga_id)).context, context)

    other = await create(storage, {"before": True})
    await storage.update_context(other, context)
    assert_same_json((await storage.get_saga(other)).context, context)


async def test_context_round_trips_through_a_run(storage: Any) -> None:
    created, updated = new_id(), await create(storage)
    async with storage.create_run() as run:
        await run.create_saga(created, NAME, NESTED)
        await run.commit()
        assert_same_json((await run.load_saga_state(created))[1], NESTED)
        await run.update_context(updated, NESTED)
        await run.commit()
    assert_same_json((await storage.get_saga(created)).context, NESTED)
    assert_same_json((await storage.get_saga(updated)).context, NESTED)


async def test_context_round_trips_through_start_and_list(storage: Any) -> None:
    saga_id = new_id()
    async with storage.create_run() as run:
        state, created = await run.start(
            saga_id, NAME, NESTED, fingerprint=None, lease_seconds=LONG_LEASE
        )
    assert created is True
    assert_same_json(state.context, NESTED)
    [listed] = await storage.list_sagas()
    assert_same_json(listed.context, NESTED)


@pytest.mark.parametrize("context", NOT_JSON)
async def test_create_saga_with_a_non_json_context_writes_nothing(
    storage: Any, context: dict[str, Any]
) -> None:
    saga_id = new_id()
    with pytest.raises(SagaSerializationError) as raised:
        await storage.create_saga(saga_id, NAME, context)
    assert isinstance(raised.value, SagaError)
    assert isinstance(raised.value, TypeError)

    with pytest.raises(SagaNotFoundError):
        await storage.get_saga(saga_id)
    assert await storage.get_step_history(saga_id) == []
    assert await storage.list_sagas() == []


@pytest.mark.parametrize("context", NOT_JSON)
async def test_update_context_with_a_non_json_context_writes_nothing(
    storage: Any, context: dict[str, Any]
) -> None:
    saga_id = await create(storage, {"n": 1})
    await assert_writes_nothing(
        storage, saga_id, SagaSerializationError,
        lambda: storage.update_context(saga_id, context),
    )


@pytest.mark.parametrize("context", NOT_JSON)
async def test_a_checkpoint_with_a_non_json_context_writes_nothing(
    storage: Any, context: dict[str, Any]
) -> None:
    """The error may come from ``update_context`` or from ``commit``; either way the log
    entries and status buffered with the bad context are not written."""
    saga_id = await create(storage, {"n": 1})

    async def checkpoint() -> None:
        async with storage.create_run() as run:
            await buffer_checkpoint(run, saga_id, context=context, status=SagaStatus.RUNNING)
            await run.commit()

    await assert_writes_nothing(storage, saga_id, SagaSerializationError, checkpoint)


@pytest.mark.parametrize("context", NOT_JSON)
async def test_start_with_a_non_json_context_creates_nothing(
    storage: Any, context: dict[str, Any]
) -> None:
    saga_id = new_id()
    async with storage.create_run() as run:
        with pytest.raises(SagaSerializationError):
            await run.start(saga_id, NAME, context, fingerprint="f", lease_seconds=LONG_LEASE)
    with pytest.raises(SagaNotFoundError):
        await snapshot(storage, saga_id)
