"""Fallback steps with a circuit breaker: an order saga whose card payment has a backup gateway.

The saga is ``ReserveInventory, Fallback(ChargeCard -> ChargeBackupGateway), ShipOrder``.
Four scenarios, each printed with its step results and step log:

1. The main gateway times out: the backup gateway charges the card instead.
2. The main gateway keeps timing out: after 2 failures the circuit opens and the next saga does
   not even try it (the log says ``sagakit.CircuitOpenError``).
3. The card is declined (not a gateway outage, so not in ``failure_exceptions``): no fallback;
   the saga compensates.
4. Shipping fails after the backup gateway charged: the backup charge is refunded (the step
   that completed is the one compensated), then the reservation released.

Run it with ``python examples/saga_fallback.py`` (an in-process ``CircuitBreaker``), or
``python examples/saga_fallback.py --redis redis://127.0.0.1:6379/0`` to keep the breaker's
state in Redis (``RedisCircuitBreaker``, shared by every process of the service).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import uuid
from typing import Any

from sagakit import (
    CircuitBreaker,
    Fallback,
    MemorySagaStorage,
    Saga,
    SagaContext,
    SagaStepHandler,
)


class GatewayTimeout(ConnectionError):
    """The payment gateway did not answer: an outage, worth trying the backup for."""


class CardDeclined(Exception):
    """The bank said no: the backup gateway would say no too."""


# -- services (in memory, for the example) -----------------------------------------------------


class Services:
    def __init__(self) -> None:
        self.main_gateway_down = False
        self.declined_cards: set[str] = set()
        self.unshippable: set[str] = set()
        self.charges: dict[str, str] = {}

    async def charge(self, gateway: str, order_id: str, card: str) -> str:
        if gateway == "main" and self.main_gateway_down:
            print(f"  {gateway} gateway: no answer for {order_id}")
            raise GatewayTimeout(f"{gateway} gateway timed out")
        if card in self.declined_cards:
            print(f"  {gateway} gateway: card {card} declined")
            raise CardDeclined(f"card {card} declined")
        charge_id = f"{gateway}-{order_id}"
        self.charges[charge_id] = order_id
        print(f"  {gateway} gateway: charged {order_id} as {charge_id}")
        return charge_id

    async def refund(self, charge_id: str) -> None:
        self.charges.pop(charge_id, None)
        print(f"  refunded {charge_id}")


@dataclasses.dataclass
class OrderContext(SagaContext):
    order_id: str
    card: str = "4242"
    address: str = "1 Main Street"
    reservation: str | None = None
    charge_id: str | None = None
    attempts: list[str] = dataclasses.field(default_factory=list)


class Step(SagaStepHandler[OrderContext, str]):
    def __init__(self, services: Services) -> None:
        self.services = services


class ReserveInventory(Step):
    async def act(self, context: OrderContext) -> str:
        context.reservation = f"reservation-{context.order_id}"
        print(f"  inventory: reserved {context.reservation}")
        return context.reservation

    async def compensate(self, context: OrderContext) -> None:
        print(f"  inventory: released {context.reservation}")


class ChargeCard(Step):
    async def act(self, context: OrderContext) -> str:
        context.attempts.append("main")  # undone if this step hands over to the fallback
        context.charge_id = await self.services.charge("main", context.order_id, context.card)
        return context.charge_id

    async def compensate(self, context: OrderContext) -> None:
        if context.charge_id:
            await self.services.refund(context.charge_id)


class ChargeBackupGateway(Step):
    async def act(self, context: OrderContext) -> str:
        context.attempts.append("backup")
        context.charge_id = await self.services.charge("backup", context.order_id, context.card)
        return context.charge_id

    async def compensate(self, context: OrderContext) -> None:
        if context.charge_id:
            await self.services.refund(context.charge_id)


class ShipOrder(Step):
    async def act(self, context: OrderContext) -> str:
        if context.address in self.services.unshippable:
            raise RuntimeError(f"cannot ship to {context.address!r}")
        print(f"  shipping: {context.order_id} to {context.address}")
        return f"shipment-{context.order_id}"

    async def compensate(self, context: OrderContext) -> None:
        print(f"  shipping: cancelled {context.order_id}")


def order_saga(breaker: Any) -> Saga[OrderContext]:
    class OrderSaga(Saga[OrderContext]):
        steps = [
            ReserveInventory,
            Fallback(
                step=ChargeCard,
                fallback=ChargeBackupGateway,
                failure_exceptions=(GatewayTimeout,),
                circuit_breaker=breaker,
            ),
            ShipOrder,
        ]

    return OrderSaga()


async def run(saga: Saga[OrderContext], services: Services, storage: MemorySagaStorage,
              context: OrderContext) -> None:
    txn = saga.transaction(context=context, container=lambda step: step(services),
                           storage=storage, saga_id=uuid.uuid4())
    try:
        async with txn:
            async for result in txn:
                line = f"Step completed: {result.step_name} -> {result.response}"
                if result.error_type:  # completed by the fallback: this is why
                    line += f" (fallback; the primary did not: {result.error_type})"
                print(line)
    except Exception as exc:
        print(f"Saga failed: {type(exc).__name__}: {exc}")
    print(f"Saga status: {txn.status}; charge attempts kept in the context: {context.attempts}")
    for entry in await storage.get_step_history(txn.saga_id):
        why = f" [{entry.error_type}]" if entry.error_type else ""
        print(f"  log: {entry.step_name} {entry.action} {entry.status}{why}")


async def main(redis_url: str | None) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="  (log) %(message)s")
    client: Any = None
    if redis_url:
        from redis.asyncio import Redis

        from sagakit import RedisCircuitBreaker

        client = Redis.from_url(redis_url)
        prefix = f"sagakit:example:{uuid.uuid4().hex}:"
        breaker: Any = RedisCircuitBreaker(client, failure_threshold=2, reset_timeout=30.0,
                                           key_prefix=prefix)
        print(f"Circuit breaker: RedisCircuitBreaker at {redis_url} (prefix {prefix})")
    else:
        breaker = CircuitBreaker(failure_threshold=2, reset_timeout=30.0)
        print("Circuit breaker: in-process CircuitBreaker")
    services, storage = Services(), MemorySagaStorage()
    saga = order_saga(breaker)

    print("\n== Scenario 1: the main gateway times out; the backup charges")
    services.main_gateway_down = True
    await run(saga, services, storage, OrderContext("order-1"))

    print("\n== Scenario 2: a second timeout opens the circuit; the third order skips the main gateway")
    await run(saga, services, storage, OrderContext("order-2"))
    await run(saga, services, storage, OrderContext("order-3"))

    print("\n== Scenario 3: a declined card is no outage: no fallback, the saga compensates")
    services.main_gateway_down = False
    if redis_url:
        await breaker.reset("ChargeCard")
    else:
        await breaker.reset()
    services.declined_cards.add("0000")
    await run(saga, services, storage, OrderContext("order-4", card="0000"))

    print("\n== Scenario 4: shipping fails after the backup charged: the backup charge is refunded")
    services.main_gateway_down = True
    services.unshippable.add("Atlantis")
    await run(saga, services, storage, OrderContext("order-5", address="Atlantis"))
    print(f"\nCharges still standing: {sorted(services.charges)}")
    if client is not None:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", metavar="URL", help="keep the breaker's state in Redis")
    asyncio.run(main(parser.parse_args().redis))
