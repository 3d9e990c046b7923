"""Fallback steps after a crash: a primary cut off after its effect is compensated before its
alternative runs; a recorded hand-over runs the alternative directly.

The saga is ``Reserve, Fallback(Charge -> ChargeBackup)`` over an in-memory :class:`Ledger`
that, as a payment service would, deduplicates charges and refunds by idempotency key. A crash
is a :class:`Crash` (a BaseException: the saga stays at its last checkpoint) raised by the
primary right after its charge, before its checkpoint.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest

from sagakit import (
    CircuitBreaker,
    Fallback,
    MemorySagaStorage,
    Saga,
    SagaContext,
    SagaStatus,
    SagaStepHandler,
    abort_saga,
    recover_saga,
    resume_saga,
)
from sagakit.diagram import instance_flowchart
from tests.unit.support import Crash, history


class GatewayDown(ConnectionError):
    pass


class RefundDown(ConnectionError):
    pass


@dataclasses.dataclass
class Order(SagaContext):
    order_id: str = "o-1"


class Ledger:
    """Charges and refunds by idempotency key, each key at most once; the calls in order."""

    def __init__(self) -> None:
        self.charged: dict[str, str] = {}  # act key -> gateway
        self.refunded: set[str] = set()
        self.calls: list[tuple[str, str]] = []  # (what, gateway) per call, even deduplicated

    def charge(self, gateway: str, key: str) -> None:
        self.calls.append(("charge", gateway))
        self.charged.setdefault(key, gateway)

    def refund(self, gateway: str, key: str) -> None:
        """A no-op when nothing was charged under the act's key (the compensation contract)."""
        self.calls.append(("refund", gateway))
        act_key = key.removesuffix(":compensate") + ":act"
        if act_key in self.charged:
            self.refunded.add(act_key)

    def standing(self) -> list[str]:
        """Gateways of the charges not refunded."""
        return sorted(g for k, g in self.charged.items() if k not in self.refunded)


@dataclasses.dataclass
class World:
    """What the gateways do in a test."""

    ledger: Ledger = dataclasses.field(default_factory=Ledger)
    crash_after_charge: set[str] = dataclasses.field(default_factory=set)
    down: set[str] = dataclasses.field(default_factory=set)
    refund_down: set[str] = dataclasses.field(default_factory=set)
    crash_in_refund: set[str] = dataclasses.field(default_factory=set)
    reserved: int = 0
    released: int = 0


world = World()


class Reserve(SagaStepHandler[Order, None]):
    async def act(self, context: Order) -> None:
        world.reserved += 1

    async def compensate(self, context: Order) -> None:
        world.released += 1


class Gateway(SagaStepHandler[Order, str]):
    gateway = ""

    async def act(self, context: Order) -> str:
        if self.gateway in world.down:
            world.ledger.calls.append(("charge", self.gateway))
            raise GatewayDown(f"{self.gateway} down")
        world.ledger.charge(self.gateway, self.idempotency_key)
        if self.gateway in world.crash_after_charge:
            world.crash_after_charge.discard(self.gateway)
            raise Crash  # the process dies after the charge, before the checkpoint
        return f"{self.gateway}-charge"

    async def compensate(self, context: Order) -> None:
        if self.gateway in world.crash_in_refund:
            world.crash_in_refund.discard(self.gateway)
            raise Crash
        if self.gateway in world.refund_down:
            world.ledger.calls.append(("refund", self.gateway))
            raise RefundDown(f"{self.gateway} refunds down")
        world.ledger.refund(self.gateway, self.idempotency_key)


class Charge(Gateway):
    gateway = "main"


class ChargeBackup(Gateway):
    gateway = "backup"


def order_saga(breaker: CircuitBreaker | None = None) -> Saga[Order]:
    class OrderSaga(Saga[Order]):
        steps = [Reserve, Fallback(step=Charge, fallback=ChargeBackup,
                                   failure_exceptions=(GatewayDown,), circuit_breaker=breaker)]

    return OrderSaga()


OPTIONS: dict[str, Any] = {"compensation_retry_count": 2, "compensation_retry_delay": 0.0}


@pytest.fixture(autouse=True)
def fresh_world() -> None:
    global world
    world = World()


async def crashed_after_the_primary_charged(storage: MemorySagaStorage, saga: Saga[Order]) -> uuid.UUID:
    """A first run whose primary charges and then dies before its checkpoint."""
    world.crash_after_charge.add("main")
    transaction = saga.transaction(context=Order(), storage=storage, **OPTIONS)
    with pytest.raises(Crash):
        await transaction.run()
    assert world.ledger.standing() == ["main"]
    assert await history(storage, transaction.saga_id) == [("Reserve", "act", "COMPLETED")]
    return transaction.saga_id


async def test_a_primary_cut_off_after_its_effect_is_compensated_before_the_fallback(storage):
    saga = order_saga()
    saga_id = await crashed_after_the_primary_charged(storage, saga)
    world.down.add("main")

    status = await recover_saga(saga, saga_id, Order, None, storage, **OPTIONS)
    assert status is SagaStatus.COMPLETED
    assert world.ledger.calls == [
        ("charge", "main"),  # the first run's charge, cut off
        ("charge", "main"),  # recovery runs the primary again: it fails now
        ("refund", "main"),  # so its earlier attempt is compensated first
        ("charge", "backup"),
    ]
    assert world.ledger.standing() == ["backup"]
    assert await history(storage, saga_id) == [
        ("Reserve", "act", "COMPLETED"),
        ("Charge", "compensate", "STARTED"),
        ("Charge", "act", "FAILED"),
        ("Charge", "compensate", "COMPENSATED"),
        ("ChargeBackup", "act", "COMPLETED"),
    ]


async def test_an_open_circuit_after_the_crash_compensates_the_primary_without_calling_it(
    storage,
):
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=60.0)
    saga = order_saga(breaker)
    saga_id = await crashed_after_the_primary_charged(storage, saga)
    await breaker.record_failure("Charge", GatewayDown("down"))  # another saga opened it

    status = await recover_saga(saga, saga_id, Order, None, storage, **OPTIONS)
    assert status is SagaStatus.COMPLETED
    assert world.ledger.calls == [("charge", "main"), ("refund", "main"), ("charge", "backup")]
    assert world.ledger.standing() == ["backup"]
    failed = [e for e in await storage.get_step_history(saga_id) if e.status.value == "FAILED"]
    assert [e.error_type for e in failed] == ["sagakit.CircuitOpenError"]


async def test_a_primary_that_succeeds_on_recovery_is_not_compensated(storage):
    saga = order_saga()
    saga_id = await crashed_after_the_primary_charged(storage, saga)

    assert await recover_saga(saga, saga_id, Order, None, storage, **OPTIONS) is (
        SagaStatus.COMPLETED
    )
    assert world.ledger.calls == [("charge", "main"), ("charge", "main")]  # deduplicated
    assert world.ledger.standing() == ["main"]
    assert (await history(storage, saga_id))[1:] == [("Charge", "act", "COMPLETED")]


async def test_a_recorded_hand_over_runs_the_fallback_directly(storage):
    saga = order_saga()
    world.down.add("main")
    world.crash_after_charge.add("backup")
    transaction = saga.transaction(context=Order(), storage=storage, **OPTIONS)
    with pytest.raises(Crash):
        await transaction.run()
    saga_id = transaction.saga_id
    assert await history(storage, saga_id) == [
        ("Reserve", "act", "COMPLETED"), ("Charge", "act", "FAILED"),  # the durable hand-over
    ]

    world.down.clear()  # even with the primary healthy again, it does not run again
    status = await recover_saga(saga, saga_id, Order, None, storage, **OPTIONS)
    assert status is SagaStatus.COMPLETED
    assert world.ledger.calls == [("charge", "main"), ("charge", "backup"), ("charge", "backup")]
    assert world.ledger.standing() == ["backup"]
    assert (await history(storage, saga_id))[2:] == [("ChargeBackup", "act", "COMPLETED")]


async def test_resuming_by_id_reports_why_the_primary_did_not_complete(storage):
    saga = order_saga()
    world.down.add("main")
    world.crash_after_charge.add("backup")
    first = saga.transaction(context=Order(), storage=storage, **OPTIONS)
    with pytest.raises(Crash):
        await first.run()

    resumed = saga.transaction(context=Order(), storage=storage, saga_id=first.saga_id, **OPTIONS)
    results = [result async for result in resumed]
    [charged] = results
    assert charged.step_name == "ChargeBackup"
    assert charged.error_type == f"{__name__}.GatewayDown"
    assert charged.error_message == "GatewayDown: main down"


async def test_a_crash_during_the_compensation_of_the_primary_never_runs_the_primary_again(
    storage,
):
    saga = order_saga()
    saga_id = await crashed_after_the_primary_charged(storage, saga)
    world.down.add("main")
    world.crash_in_refund.add("main")
    with pytest.raises(Crash):
        await recover_saga(saga, saga_id, Order, None, storage, **OPTIONS)
    assert await history(storage, saga_id) == [  # the hand-over and the pending compensation
        ("Reserve", "act", "COMPLETED"),
        ("Charge", "compensate", "STARTED"),
        ("Charge", "act", "FAILED"),
    ]

    world.down.clear()  # the primary would succeed now, but the hand-over is decided
    status = await recover_saga(saga, saga_id, Order, None, storage, **OPTIONS)
    assert status is SagaStatus.COMPLETED
    assert world.ledger.calls == [
        ("charge", "main"), ("charge", "main"), ("refund", "main"), ("charge", "backup"),
    ]
    assert world.ledger.standing() == ["backup"]
    assert (await history(storage, saga_id))[3:] == [
        ("Charge", "compensate", "COMPENSATED"), ("ChargeBackup", "act", "COMPLETED"),
    ]


async def test_a_primary_that_cannot_be_compensated_fails_the_step(storage):
    saga = order_saga()
    saga_id = await crashed_after_the_primary_charged(storage, saga)
    world.down.add("main")
    world.refund_down.add("main")

    status = await recover_saga(saga, saga_id, Order, None, storage, **OPTIONS)
    assert status is SagaStatus.COMPENSATING  # the primary's compensation is still owed
    assert ("charge", "backup") not in world.ledger.calls  # no double charge risked
    assert world.released == 1  # the earlier steps are compensated
    assert await history(storage, saga_id) == [
        ("Reserve", "act", "COMPLETED"),
        ("Charge", "compensate", "STARTED"),
        ("Charge", "act", "FAILED"),
        ("Charge", "compensate", "FAILED"),
        ("Charge", "act", "FAILED"),
        ("Reserve", "compensate", "COMPENSATED"),
    ]

    world.refund_down.clear()
    assert await recover_saga(saga, saga_id, Order, None, storage, **OPTIONS) is SagaStatus.FAILED
    assert world.ledger.standing() == []
    assert world.released == 1
    assert ("charge", "backup") not in world.ledger.calls


async def test_a_parked_saga_with_a_pending_compensation_of_the_primary_resumes_forward(
    storage,
):
    saga = order_saga()
    saga_id = await crashed_after_the_primary_charged(storage, saga)
    world.down.add("main")
    world.crash_in_refund.add("main")
    with pytest.raises(Crash):
        await recover_saga(saga, saga_id, Order, None, storage, **OPTIONS)
    await storage.update_status(saga_id, SagaStatus.PARKED)

    assert await resume_saga(saga, saga_id, Order, None, storage, compensation_retry_delay=0.0) is (
        SagaStatus.COMPLETED
    )
    assert world.ledger.standing() == ["backup"]
    assert world.released == 0


async def test_aborting_with_a_pending_compensation_of_the_primary_compensates_it(storage):
    saga = order_saga()
    saga_id = await crashed_after_the_primary_charged(storage, saga)
    world.down.add("main")
    world.crash_in_refund.add("main")
    with pytest.raises(Crash):
        await recover_saga(saga, saga_id, Order, None, storage, **OPTIONS)

    assert await abort_saga(saga, saga_id, Order, None, storage, compensation_retry_delay=0.0) is (
        SagaStatus.FAILED
    )
    assert world.ledger.standing() == []
    assert world.released == 1
    assert ("charge", "backup") not in world.ledger.calls


async def test_a_first_run_never_compensates_the_primary(storage):
    saga = order_saga()
    world.down.add("main")
    assert await saga.transaction(context=Order(), storage=storage, **OPTIONS).run() is (
        SagaStatus.COMPLETED
    )
    assert world.ledger.calls == [("charge", "main"), ("charge", "backup")]


async def test_only_the_step_a_resumed_run_starts_at_has_an_unknown_attempt(storage):
    saga = order_saga()
    transaction = saga.transaction(context=Order(), storage=storage, **OPTIONS)
    async with transaction:
        async for _ in transaction:
            break  # stopped after Reserve: the fallback step never started
    world.down.add("main")
    # resumed at the fallback step: the primary's compensation is a no-op, nothing was charged
    status = await recover_saga(saga, transaction.saga_id, Order, None, storage, **OPTIONS)
    assert status is SagaStatus.COMPLETED
    assert world.ledger.calls == [("charge", "main"), ("refund", "main"), ("charge", "backup")]
    assert world.ledger.standing() == ["backup"]

    class Later(Saga[Order]):  # the fallback step after the step the run resumes at
        name = "Later"
        steps = [Reserve, Fallback(step=Charge, fallback=ChargeBackup,
                                   failure_exceptions=(GatewayDown,))]

    world.ledger.calls.clear()
    state_id = uuid.uuid4()
    await storage.create_saga(state_id, "Later", Order().to_dict())
    await storage.update_status(state_id, SagaStatus.RUNNING)
    assert await recover_saga(Later(), state_id, Order, None, storage, **OPTIONS) is (
        SagaStatus.COMPLETED
    )
    assert world.ledger.calls == [("charge", "main"), ("charge", "backup")]


async def test_a_first_step_whose_primary_cannot_be_compensated_leaves_the_saga_compensating(
    storage,
):
    class PayOnly(Saga[Order]):
        steps = [Fallback(step=Charge, fallback=ChargeBackup, failure_exceptions=(GatewayDown,))]

    world.crash_after_charge.add("main")
    transaction = PayOnly().transaction(context=Order(), storage=storage, **OPTIONS)
    with pytest.raises(Crash):
        await transaction.run()
    world.down.add("main")
    world.refund_down.add("main")

    # nothing completed before the step, but the primary's compensation is owed: not FAILED
    status = await recover_saga(PayOnly(), transaction.saga_id, Order, None, storage, **OPTIONS)
    assert status is SagaStatus.COMPENSATING
    assert world.ledger.standing() == ["main"]
    world.refund_down.clear()
    status = await recover_saga(PayOnly(), transaction.saga_id, Order, None, storage, **OPTIONS)
    assert status is SagaStatus.FAILED
    assert world.ledger.standing() == []
    assert ("charge", "backup") not in world.ledger.calls


async def test_the_diagram_does_not_show_the_primarys_compensation_as_the_steps(storage):
    class Ship(Reserve):
        pass

    class ShippedOrderSaga(Saga[Order]):
        steps = [Reserve, Fallback(step=Charge, fallback=ChargeBackup,
                                   failure_exceptions=(GatewayDown,)), Ship]

    saga = ShippedOrderSaga()
    saga_id = await crashed_after_the_primary_charged(storage, saga)
    world.down.add("main")
    await recover_saga(saga, saga_id, Order, None, storage, **OPTIONS)
    chart = instance_flowchart(saga, await storage.get_saga(saga_id),
                               await storage.get_step_history(saga_id))
    assert "compensate ChargeBackup<br/>not run" in chart
    assert "<br/>compensated" not in chart
