"""The seed's "Basic Example" on sagakit: an order saga that succeeds, and one that is rolled back.

Three steps (reserve inventory, charge payment, ship) run in order through a mediator. In the
second scenario shipping fails, so the payment is refunded and the reservation released, in
reverse order, and the shipping error reaches the caller.

Run it with ``python examples/saga.py``.
"""

import asyncio
import dataclasses
import uuid

import di
from di.dependent import Dependent

import sagakit
from sagakit import SagaContext, bootstrap
from sagakit.saga import Saga
from sagakit.step import SagaStepHandler, SagaStepResult
from sagakit.storage.memory import MemorySagaStorage


@dataclasses.dataclass
class Response:
    """What a step reports back (the seed imports it from ``cqrs.response``)."""

    message: str = ""


# -- services the steps call (in memory, for the example) -------------------------------------


class InventoryService:
    def __init__(self) -> None:
        self.stock = {"item_1": 5, "item_2": 2}
        self._reservations: dict[str, list[str]] = {}

    async def reserve_items(self, order_id: str, items: list[str]) -> str:
        for item in items:
            if self.stock.get(item, 0) < 1:
                raise RuntimeError(f"{item} is out of stock")
        for item in items:
            self.stock[item] -= 1
        reservation_id = f"reservation-{order_id}"
        self._reservations[reservation_id] = list(items)
        print(f"  inventory: reserved {items} as {reservation_id}")
        return reservation_id

    async def release_items(self, reservation_id: str) -> None:
        for item in self._reservations.pop(reservation_id, []):
            self.stock[item] += 1
        print(f"  inventory: released {reservation_id}")


class PaymentService:
    def __init__(self) -> None:
        self.charged: dict[str, float] = {}

    async def charge(self, order_id: str, amount: float) -> str:
        payment_id = f"payment-{order_id}"
        self.charged[payment_id] = amount
        print(f"  payment: charged {amount:.2f} as {payment_id}")
        return payment_id

    async def refund(self, payment_id: str) -> None:
        amount = self.charged.pop(payment_id, 0.0)
        print(f"  payment: refunded {amount:.2f} of {payment_id}")


class ShippingService:
    def __init__(self, unreachable: set[str]) -> None:
        self.unreachable = unreachable

    async def ship(self, order_id: str, address: str) -> str:
        if address in self.unreachable:
            raise RuntimeError(f"cannot ship to {address!r}")
        shipment_id = f"shipment-{order_id}"
        print(f"  shipping: {shipment_id} to {address}")
        return shipment_id

    async def cancel(self, shipment_id: str) -> None:
        print(f"  shipping: cancelled {shipment_id}")


# -- context and steps -------------------------------------------------------------------------


@dataclasses.dataclass
class OrderContext(SagaContext):
    order_id: str
    items: list[str]
    total_amount: float
    shipping_address: str = "1 Main Street"
    inventory_reservation_id: str | None = None
    payment_id: str | None = None
    shipment_id: str | None = None


class ReserveInventoryStep(SagaStepHandler[OrderContext, Response]):
    def __init__(self, inventory_service: InventoryService) -> None:
        self._inventory_service = inventory_service

    async def act(self, context: OrderContext) -> SagaStepResult:
        reservation_id = await self._inventory_service.reserve_items(
            context.order_id, context.items
        )
        context.inventory_reservation_id = reservation_id
        return self._generate_step_result(Response(f"reserved {reservation_id}"))

    async def compensate(self, context: OrderContext) -> None:
        if context.inventory_reservation_id:
            await self._inventory_service.release_items(context.inventory_reservation_id)


class ProcessPaymentStep(SagaStepHandler[OrderContext, Response]):
    def __init__(self, payment_service: PaymentService) -> None:
        self._payment_service = payment_service

    async def act(self, context: OrderContext) -> SagaStepResult:
        context.payment_id = await self._payment_service.charge(
            context.order_id, context.total_amount
        )
        return self._generate_step_result(Response(f"charged {context.payment_id}"))

    async def compensate(self, context: OrderContext) -> None:
        if context.payment_id:
            await self._payment_service.refund(context.payment_id)


class ShipOrderStep(SagaStepHandler[OrderContext, Response]):
    def __init__(self, shipping_service: ShippingService) -> None:
        self._shipping_service = shipping_service

    async def act(self, context: OrderContext) -> SagaStepResult:
        context.shipment_id = await self._shipping_service.ship(
            context.order_id, context.shipping_address
        )
        return self._generate_step_result(Response(f"shipped {context.shipment_id}"))

    async def compensate(self, context: OrderContext) -> None:
        if context.shipment_id:
            await self._shipping_service.cancel(context.shipment_id)


# Define saga class with steps
class OrderSaga(Saga[OrderContext]):
    steps = [ReserveInventoryStep, ProcessPaymentStep, ShipOrderStep]


# Register saga in SagaMap
def saga_mapper(mapper: sagakit.SagaMap) -> None:
    mapper.bind(OrderContext, OrderSaga)


def build_container(
    inventory: InventoryService, payments: PaymentService, shipping: ShippingService
) -> di.Container:
    """A ``di`` container, as in the seed; the services are shared instances."""
    container = di.Container()
    for service_type, instance in (
        (InventoryService, inventory),
        (PaymentService, payments),
        (ShippingService, shipping),
    ):
        provider = Dependent(lambda instance=instance: instance, scope="saga")
        container.bind(di.bind_by_type(provider, service_type))
    return container


async def run_order(mediator: sagakit.SagaMediator, context: OrderContext) -> uuid.UUID:
    saga_id = uuid.uuid4()
    async for step_result in mediator.stream(context, saga_id=saga_id):
        print(f"Step completed: {step_result.step_type.__name__} ({step_result.response.message})")
    return saga_id


async def report(storage: MemorySagaStorage, saga_id: uuid.UUID) -> None:
    saga = await storage.get_saga(saga_id)
    print(f"Saga {saga.name} status: {saga.status.value}")
    for entry in await storage.get_step_history(saga_id):
        print(f"  log: {entry.step_name} {entry.action.value} {entry.status.value}")


async def main() -> None:
    inventory = InventoryService()
    payments = PaymentService()
    shipping = ShippingService(unreachable={"Atlantis"})
    storage = MemorySagaStorage()
    mediator = bootstrap.bootstrap(
        di_container=build_container(inventory, payments, shipping),
        sagas_mapper=saga_mapper,
        saga_storage=storage,
    )

    print("== Scenario 1: the order goes through ==")
    context = OrderContext(order_id="123", items=["item_1"], total_amount=100.0)
    saga_id = await run_order(mediator, context)
    await report(storage, saga_id)

    print()
    print("== Scenario 2: shipping fails, earlier steps are compensated ==")
    context = OrderContext(
        order_id="456", items=["item_2"], total_amount=42.5, shipping_address="Atlantis"
    )
    saga_id = uuid.uuid4()
    try:
        async for step_result in mediator.stream(context, saga_id=saga_id):
            print(f"Step completed: {step_result.step_type.__name__}")
    except RuntimeError as exc:
        print(f"Saga failed: {exc}")
    await report(storage, saga_id)
    print(f"Stock after rollback: {inventory.stock}")
    print(f"Payments still charged: {sorted(payments.charged)}")


if __name__ == "__main__":
    asyncio.run(main())
