"""Fallback steps: when the alternative runs, what it sees, what the log and results say, what
is compensated, and recovery after a crash inside a fallback step.

The saga under test is ``StepA, Fallback(StepB -> StepD), StepC`` on the scripted handlers of
``tests.unit.support``: each appends its name to ``context.trail`` on act.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pydantic
import pytest

from sagakit import (
    CircuitBreaker,
    CircuitOpenError,
    Fallback,
    MemorySagaStorage,
    Saga,
    SagaDefinitionError,
    SagaStatus,
    SagaStepHandler,
    recover_saga,
)
from sagakit.breaker import CIRCUIT_OPEN_ERROR_TYPE
from sagakit.saga import definition_fingerprint
from tests.unit.support import (
    Crash,
    Ctx,
    Snapshots,
    StepA,
    StepB,
    StepC,
    StepD,
    ThreeStepSaga,
    drive,
    history,
    state,
    transaction,
)


def fallback_saga(**options: Any) -> Saga[Ctx]:
    """A fresh ``StepA, Fallback(StepB -> StepD, **options), StepC`` saga."""

    class FallbackSaga(Saga[Ctx]):
        steps = [StepA, Fallback(step=StepB, fallback=StepD, **options), StepC]

    return FallbackSaga()


async def entries(storage: MemorySagaStorage, saga_id: uuid.UUID) -> list[tuple[Any, ...]]:
    return [(e.step_name, e.action.value, e.status.value, e.error_type, e.details)
            for e in await storage.get_step_history(saga_id)]


# -- when the fallback runs ------------------------------------------------------------------------


async def test_a_listed_exception_hands_over_to_the_fallback(storage, script):
    script.fail("StepB", "act", ConnectionError("payments down"))
    txn = transaction(fallback_saga(failure_exceptions=(ConnectionError,)), script, storage)
    results = await drive(txn)
    assert script.acts() == ["StepA", "StepB", "StepD", "StepC"]
    assert txn.status is SagaStatus.COMPLETED
    assert txn.context.trail == ["StepA", "StepD", "StepC"]
    assert [r.step_name for r in results] == ["StepA", "StepD", "StepC"]
    assert script.compensations() == []


async def test_an_unlisted_exception_fails_the_step_and_the_fallback_never_runs(storage, script):
    script.fail("StepB", "act", ValueError("bad card"))
    txn = transaction(fallback_saga(failure_exceptions=(ConnectionError,)), script, storage)
    with pytest.raises(ValueError, match="bad card"):
        await drive(txn)
    assert script.acts() == ["StepA", "StepB"]
    assert script.compensations() == ["StepA"]
    assert txn.status is SagaStatus.FAILED
    assert await history(storage, txn.saga_id) == [
        ("StepA", "act", "COMPLETED"),
        ("StepB", "act", "FAILED"),
        ("StepA", "compensate", "COMPENSATED"),
    ]


async def test_subclasses_of_a_listed_exception_hand_over_too(storage, script):
    script.fail("StepB", "act", ConnectionRefusedError("refused"))
    txn = transaction(fallback_saga(failure_exceptions=(ConnectionError,)), script, storage)
    await drive(txn)
    assert script.acts() == ["StepA", "StepB", "StepD", "StepC"]


@pytest.mark.parametrize("error", [ValueError("v"), RuntimeError("r"), KeyError("k")])
async def test_any_exception_hands_over_when_none_are_listed(storage, script, error):
    script.fail("StepB", "act", error)
    txn = transaction(fallback_saga(), script, storage)
    await drive(txn)
    assert script.acts() == ["StepA", "StepB", "StepD", "StepC"]
    assert txn.status is SagaStatus.COMPLETED


async def test_a_base_exception_of_the_primary_is_not_handed_over(storage, script):
    script.fail("StepB", "act", Crash())
    txn = transaction(fallback_saga(), script, storage)
    with pytest.raises(Crash):
        await drive(txn)
    assert script.acts() == ["StepA", "StepB"]
    assert script.compensations() == []
    assert await history(storage, txn.saga_id) == [("StepA", "act", "COMPLETED")]


async def test_a_primary_that_succeeds_completes_the_step_as_a_plain_step(storage, script):
    txn = transaction(fallback_saga(), script, storage)
    results = await drive(txn)
    assert script.acts() == ["StepA", "StepB", "StepC"]
    assert (results[1].step_type, results[1].step_name) == (StepB, "StepB")
    assert (results[1].error_type, results[1].error_message) == (None, None)
    assert [e[:3] for e in await entries(storage, txn.saga_id)][1] == ("StepB", "act", "COMPLETED")


async def test_a_failing_fallback_fails_the_step_and_the_saga_compensates(storage, script):
    script.fail("StepB", "act", ConnectionError("down"))
    script.fail("StepD", "act", RuntimeError("backup down too"))
    txn = transaction(fallback_saga(), script, storage)
    with pytest.raises(RuntimeError, match="backup down too"):
        await drive(txn)
    assert script.compensations() == ["StepA"]
    assert txn.status is SagaStatus.FAILED
    assert [e[:4] for e in await entries(storage, txn.saga_id)] == [
        ("StepA", "act", "COMPLETED", None),
        ("StepB", "act", "FAILED", "ConnectionError"),
        ("StepD", "act", "FAILED", "RuntimeError"),
        ("StepA", "compensate", "COMPENSATED", None),
    ]


# -- the circuit breaker -------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_an_open_circuit_runs_the_fallback_without_calling_the_primary(storage, script):
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=60)
    await breaker.record_failure("StepB", ConnectionError("earlier"))
    txn = transaction(fallback_saga(circuit_breaker=breaker), script, storage)
    results = await drive(txn)
    assert script.acts() == ["StepA", "StepD", "StepC"]
    assert results[1].error_type == CIRCUIT_OPEN_ERROR_TYPE == "sagakit.CircuitOpenError"
    assert "circuit 'StepB' is open" in results[1].error_message
    log = await entries(storage, txn.saga_id)
    assert log[1][:4] == ("StepB", "act", "FAILED", "sagakit.CircuitOpenError")
    assert log[2][:3] == ("StepD", "act", "COMPLETED")


async def test_an_open_circuit_falls_back_even_when_the_listed_errors_do_not_match(storage, script):
    breaker = CircuitBreaker(failure_threshold=1)
    await breaker.record_failure("StepB", ValueError("x"))
    saga = fallback_saga(failure_exceptions=(ConnectionError,), circuit_breaker=breaker)
    await drive(transaction(saga, script, storage))
    assert script.acts() == ["StepA", "StepD", "StepC"]


async def test_primary_failures_open_the_circuit_and_later_sagas_skip_the_primary(storage, script):
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=30, clock=clock)
    saga = fallback_saga(circuit_breaker=breaker)
    script.always("StepB", "act", ConnectionError("down"))
    for _ in range(3):
        await drive(transaction(saga, script, storage))
    assert script.count("StepB", "act") == 2  # the third saga found the circuit open
    assert script.count("StepD", "act") == 3
    script.heal("StepB", "act")
    clock.now += 30  # half-open: the next saga's primary is the trial, and it succeeds
    await drive(transaction(saga, script, storage))
    assert script.count("StepB", "act") == 3
    assert str(await breaker.state("StepB")) == "closed"


async def test_an_unlisted_error_still_counts_for_the_breaker(storage, script):
    breaker = CircuitBreaker(failure_threshold=1)
    saga = fallback_saga(failure_exceptions=(ConnectionError,), circuit_breaker=breaker)
    script.fail("StepB", "act", ValueError("bad"))
    with pytest.raises(ValueError, match="bad"):
        await drive(transaction(saga, script, storage))
    with pytest.raises(CircuitOpenError):
        await breaker.check("StepB")


async def test_one_breaker_keeps_a_separate_circuit_per_step(storage, script):
    breaker = CircuitBreaker(failure_threshold=1)

    class TwoFallbacks(Saga[Ctx]):
        steps = [
            Fallback(step=StepA, fallback=StepC, circuit_breaker=breaker),
            Fallback(step=StepB, fallback=StepD, circuit_breaker=breaker),
        ]

    await breaker.record_failure("StepA", ConnectionError("down"))
    txn = transaction(TwoFallbacks(), script, storage)
    await drive(txn)
    assert script.acts() == ["StepC", "StepB"]  # StepA's circuit is open, StepB's is not


class BrokenBreaker:
    async def check(self, name: str) -> None:
        return None

    async def record_success(self, name: str) -> None:
        raise OSError("breaker backend down")

    async def record_failure(self, name: str, error: BaseException) -> None:
        raise OSError("breaker backend down")


async def test_a_breaker_that_cannot_record_does_not_change_the_steps_outcome(storage, script):
    script.fail("StepB", "act", ConnectionError("down"))
    txn = transaction(fallback_saga(circuit_breaker=BrokenBreaker()), script, storage)
    await drive(txn)
    assert script.acts() == ["StepA", "StepB", "StepD", "StepC"]
    assert txn.status is SagaStatus.COMPLETED


class FaultyBreaker(BrokenBreaker):
    async def check(self, name: str) -> None:
        raise RuntimeError("breaker bug")


async def test_an_unexpected_error_of_the_breaker_check_fails_the_primarys_step(storage, script):
    txn = transaction(fallback_saga(circuit_breaker=FaultyBreaker()), script, storage)
    with pytest.raises(RuntimeError, match="breaker bug"):
        await drive(txn)
    assert script.acts() == ["StepA"]
    assert script.compensations() == ["StepA"]
    assert await history(storage, txn.saga_id) == [
        ("StepA", "act", "COMPLETED"),
        ("StepB", "act", "FAILED"),
        ("StepA", "compensate", "COMPENSATED"),
    ]


# -- the context the fallback sees ---------------------------------------------------------------


async def test_the_fallback_sees_the_dataclass_context_from_before_the_primary(storage, script):
    seen: list[Ctx] = []

    async def spoil(handler: Any, context: Ctx) -> None:
        context.trail.append("half-done")
        context.order_id = "spoiled"

    async def look(handler: Any, context: Ctx) -> None:
        seen.append(dataclasses.replace(context, trail=list(context.trail)))

    script.hook("StepB", "act", spoil)
    script.hook("StepD", "act", look)
    script.fail("StepB", "act", ConnectionError("down"))
    context = Ctx(order_id="o-7")
    txn = transaction(fallback_saga(), script, storage, context)
    await drive(txn)
    assert seen == [Ctx(order_id="o-7", trail=["StepA"])]
    assert txn.context is context  # restored in place: the caller's object is the live one
    assert context == Ctx(order_id="o-7", trail=["StepA", "StepD", "StepC"])
    assert (await state(storage, txn.saga_id)).context["trail"] == ["StepA", "StepD", "StepC"]


class Order(pydantic.BaseModel):
    order_id: str
    trail: list[str] = []
    note: str | None = None


class OrderStep(SagaStepHandler[Order, None]):
    seen: list[dict[str, Any]] = []

    async def act(self, context: Order) -> None:
        type(self).seen.append(context.model_dump())
        context.trail.append(type(self).__name__)

    async def compensate(self, context: Order) -> None:
        return None


class OrderFirst(OrderStep):
    pass


class OrderPrimary(OrderStep):
    async def act(self, context: Order) -> None:
        context.trail.append("half-done")
        context.note = "spoiled"
        context.order_id = "spoiled"
        raise ConnectionError("down")


class OrderAlternative(OrderStep):
    pass


class PydanticSaga(Saga[Order]):
    steps = [OrderFirst, Fallback(step=OrderPrimary, fallback=OrderAlternative)]


async def test_the_fallback_sees_the_pydantic_context_from_before_the_primary(storage):
    OrderStep.seen = []
    context = Order(order_id="o-1")
    txn = PydanticSaga().transaction(context=context, storage=storage)
    async with txn:
        async for _ in txn:
            pass
    assert OrderStep.seen == [
        {"order_id": "o-1", "trail": [], "note": None},
        {"order_id": "o-1", "trail": ["OrderFirst"], "note": None},
    ]
    assert txn.context is context
    assert context == Order(order_id="o-1", trail=["OrderFirst", "OrderAlternative"])


class DictStep(SagaStepHandler[dict[str, Any], None]):
    seen: list[dict[str, Any]] = []

    async def act(self, context: dict[str, Any]) -> None:
        type(self).seen.append(dict(context, trail=list(context["trail"])))
        context["trail"].append(type(self).__name__)

    async def compensate(self, context: dict[str, Any]) -> None:
        return None


class DictFirst(DictStep):
    pass


class DictPrimary(DictStep):
    async def act(self, context: dict[str, Any]) -> None:
        context["trail"].append("half-done")
        context["extra"] = "spoiled"
        del context["order_id"]
        raise ConnectionError("down")


class DictAlternative(DictStep):
    pass


class DictSaga(Saga[dict[str, Any]]):
    steps = [DictFirst, Fallback(step=DictPrimary, fallback=DictAlternative)]


async def test_the_fallback_sees_the_dict_context_from_before_the_primary(storage):
    DictStep.seen = []
    context: dict[str, Any] = {"order_id": "o-1", "trail": []}
    txn = DictSaga().transaction(context=context, storage=storage)
    await txn.run()
    assert DictStep.seen == [
        {"order_id": "o-1", "trail": []},
        {"order_id": "o-1", "trail": ["DictFirst"]},
    ]
    assert txn.context is context
    assert context == {"order_id": "o-1", "trail": ["DictFirst", "DictAlternative"]}


# -- the log and the results ----------------------------------------------------------------------


async def test_the_log_records_the_primary_failure_then_the_fallback_under_its_own_name(
    storage, script
):
    script.fail("StepB", "act", ConnectionError("payments down"))
    txn = transaction(fallback_saga(failure_exceptions=(ConnectionError,)), script, storage)
    results = await drive(txn)
    assert await entries(storage, txn.saga_id) == [
        ("StepA", "act", "COMPLETED", None, None),
        ("StepB", "act", "FAILED", "ConnectionError", "ConnectionError: payments down"),
        ("StepD", "act", "COMPLETED", None, None),
        ("StepC", "act", "COMPLETED", None, None),
    ]
    step = results[1]
    assert step.step_type is StepD
    assert step.step_name == "StepD"
    assert step.response == "StepD-done"
    assert step.saga_id == txn.saga_id
    assert step.error_type == "ConnectionError"
    assert step.error_message == "ConnectionError: payments down"


async def test_the_hand_over_is_its_own_checkpoint_before_the_fallback_runs(storage, script):
    script.fail("StepB", "act", ConnectionError("down"))
    txn = transaction(fallback_saga(), script, storage)
    seen = Snapshots(storage, txn.saga_id)
    script.hook("StepD", "act", seen)
    await drive(txn)
    [(status, version, log)] = seen.taken
    assert status == "RUNNING"
    assert log == [("StepA", "act", "COMPLETED"), ("StepB", "act", "FAILED")]
    assert version == 3  # the start, StepA, the hand-over
    # one commit more than a plain saga's N+1, on the fallback path only
    assert (await state(storage, txn.saga_id)).version == 5


async def test_a_primary_that_succeeds_costs_no_extra_commit(storage, script):
    txn = transaction(fallback_saga(), script, storage)
    await drive(txn)
    assert (await state(storage, txn.saga_id)).version == 4  # the start, then one per step


async def test_the_fallback_runs_with_its_own_idempotency_key(storage, script):
    keys: list[str] = []

    async def remember(handler: Any, context: Any) -> None:
        keys.append(handler.idempotency_key)

    script.hook("StepD", "act", remember)
    script.fail("StepB", "act", ConnectionError("down"))
    txn = transaction(fallback_saga(), script, storage)
    await drive(txn)
    assert keys == [f"{txn.saga_id}:StepD:act"]


# -- compensation and recovery ---------------------------------------------------------------------


async def test_a_later_failure_compensates_the_fallback_not_the_primary(storage, script):
    script.fail("StepB", "act", ConnectionError("down"))
    script.fail("StepC", "act", RuntimeError("boom"))
    txn = transaction(fallback_saga(), script, storage)
    with pytest.raises(RuntimeError, match="boom"):
        await drive(txn)
    assert script.compensations() == ["StepD", "StepA"]
    assert txn.status is SagaStatus.FAILED
    assert txn.context.trail == []


async def test_recovery_after_a_crash_inside_the_fallback_runs_the_fallback_directly(
    storage, script
):
    saga = fallback_saga(failure_exceptions=(ConnectionError,))
    script.always("StepB", "act", ConnectionError("down"))
    script.fail("StepD", "act", Crash())
    txn = transaction(saga, script, storage)
    with pytest.raises(Crash):
        await drive(txn)
    row = await state(storage, txn.saga_id)
    assert row.status is SagaStatus.RUNNING
    assert await history(storage, txn.saga_id) == [  # the hand-over is durable
        ("StepA", "act", "COMPLETED"), ("StepB", "act", "FAILED"),
    ]
    assert row.context["trail"] == ["StepA"]

    status = await recover_saga(saga, txn.saga_id, Ctx, script.container, storage)
    assert status is SagaStatus.COMPLETED
    # the primary failed before the crash: it is neither run again nor compensated
    assert script.acts() == ["StepA", "StepB", "StepD", "StepD", "StepC"]
    assert script.compensations() == []
    row = await state(storage, txn.saga_id)
    assert row.context["trail"] == ["StepA", "StepD", "StepC"]
    assert await history(storage, txn.saga_id) == [
        ("StepA", "act", "COMPLETED"),
        ("StepB", "act", "FAILED"),
        ("StepD", "act", "COMPLETED"),
        ("StepC", "act", "COMPLETED"),
    ]


async def test_recovery_compensates_a_fallback_step_after_a_crash_in_a_later_compensation(
    storage, script
):
    saga = fallback_saga()
    script.fail("StepB", "act", ConnectionError("down"))
    script.fail("StepC", "act", RuntimeError("boom"))
    script.fail("StepA", "compensate", Crash())
    txn = transaction(saga, script, storage)
    with pytest.raises(Crash):
        await drive(txn)
    status = await recover_saga(saga, txn.saga_id, Ctx, script.container, storage,
                                compensation_retry_delay=0.0)
    assert status is SagaStatus.FAILED
    assert script.compensations() == ["StepD", "StepA", "StepA"]


# -- definitions ------------------------------------------------------------------------------------


def test_a_fallback_step_is_one_step_with_two_handler_names():
    saga = fallback_saga()
    spec = saga.step_specs[1]
    assert spec.name == "StepB"
    assert spec.handler_names() == ("StepB", "StepD")
    assert saga.fingerprint == definition_fingerprint(saga.step_specs)
    assert saga.fingerprint != ThreeStepSaga.fingerprint  # the alternative is part of it
    assert "StepB -> StepD" in repr(spec.fallback)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"step": int, "fallback": StepD}, "SagaStepHandler"),
        ({"step": StepB, "fallback": "StepD"}, "SagaStepHandler"),
        ({"step": StepB, "fallback": StepB}, "same class"),
        ({"step": StepB, "fallback": StepD, "circuit_breaker": object()}, "check"),
    ],
)
def test_a_malformed_fallback_is_rejected(options, match):
    with pytest.raises(SagaDefinitionError, match=match):
        Fallback(**options)


@pytest.mark.parametrize("errors", [(ValueError, 3), ("ValueError",), 42])
def test_failure_exceptions_must_be_exception_classes(errors):
    with pytest.raises(TypeError, match="exception classes"):
        Fallback(step=StepB, fallback=StepD, failure_exceptions=errors)


def test_failure_exceptions_accept_a_single_class_or_a_list():
    assert Fallback(StepB, StepD, ConnectionError).failure_exceptions == (ConnectionError,)
    listed = Fallback(StepB, StepD, [ConnectionError, TimeoutError])  # type: ignore[arg-type]
    assert listed.failure_exceptions == (ConnectionError, TimeoutError)


def test_a_fallback_name_already_used_by_another_step_is_rejected():
    with pytest.raises(SagaDefinitionError, match="more than once"):

        class Twice(Saga[Ctx]):
            steps = [StepD, Fallback(step=StepB, fallback=StepD)]


def test_a_fallback_handler_of_another_context_type_is_rejected():
    with pytest.raises(SagaDefinitionError, match="OrderAlternative"):

        class Mixed(Saga[Ctx]):
            steps = [StepA, Fallback(step=StepB, fallback=OrderAlternative)]


# -- the example ------------------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "saga_fallback.py"


def run_example(*args: str) -> list[str]:
    done = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout.splitlines()


def example_story(lines: list[str]) -> list[str]:
    """The lines that tell what happened (no saga ids, no breaker banner)."""
    return [line for line in lines if line.startswith(("Step completed", "Saga ", "  log:", "=="))]


def test_the_example_tells_each_scenario():
    lines = run_example()
    assert lines[0] == "Circuit breaker: in-process CircuitBreaker"
    story = example_story(lines)
    fallback = ("Step completed: ChargeBackupGateway -> backup-order-1 "
                "(fallback; the primary did not: __main__.GatewayTimeout)")
    assert fallback in story
    assert ("Step completed: ChargeBackupGateway -> backup-order-3 "
            "(fallback; the primary did not: sagakit.CircuitOpenError)") in story
    assert "  log: ChargeCard act FAILED [sagakit.CircuitOpenError]" in story
    assert "  main gateway: no answer for order-3" not in lines  # the open circuit skipped it
    assert "Saga failed: CardDeclined: card 0000 declined" in story
    assert "  refunded backup-order-5" in lines
    assert "  log: ChargeBackupGateway compensate COMPENSATED" in story
    assert lines[-1] == "Charges still standing: ['backup-order-1', 'backup-order-2', 'backup-order-3']"
