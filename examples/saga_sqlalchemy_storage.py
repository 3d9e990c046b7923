"""The order saga of ``examples/saga.py``, checkpointed to a SQL database.

Three steps (reserve inventory, charge payment, ship) run through a mediator whose storage is
``SqlAlchemySagaStorage``. The first order goes through; the second cannot be shipped, so the
payment is refunded and the reservation released, in reverse order. Both sagas are then read
back from the database through a second, independent storage object: their stored status,
version, context and step history.

Run it with::

    python examples/saga_sqlalchemy_storage.py [DATABASE_URL]

The URL comes from the first argument, else from ``SAGAKIT_DATABASE_URL``, else a SQLite file in
a temporary directory is used (and removed afterwards). For example::

    python examples/saga_sqlalchemy_storage.py postgresql+asyncpg://postgres@127.0.0.1:5432/test
    python examples/saga_sqlalchemy_storage.py mysql+asyncmy://root@127.0.0.1:3306/test

The tables (created if missing) are ``saga_executions`` and ``saga_logs`` unless
``SAGAKIT_EXECUTIONS_TABLE`` / ``SAGAKIT_LOGS_TABLE`` name others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

import di
from di.dependent import Dependent
from sqlalchemy.engine import make_url

import sagakit
from sagakit import SagaContext, bootstrap
from sagakit.saga import Saga
from sagakit.step import SagaStepHandler, SagaStepResult
from sagakit.storage import SqlAlchemySagaStorage


@dataclasses.dataclass
class Response:
    """What a step reports back."""

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


class OrderSaga(Saga[OrderContext]):
    steps = [ReserveInventoryStep, ProcessPaymentStep, ShipOrderStep]


def saga_mapper(mapper: sagakit.SagaMap) -> None:
    mapper.bind(OrderContext, OrderSaga)


def build_container(
    inventory: InventoryService, payments: PaymentService, shipping: ShippingService
) -> di.Container:
    """A ``di`` container; the services are shared instances."""
    container = di.Container()
    for service_type, instance in (
        (InventoryService, inventory),
        (PaymentService, payments),
        (ShippingService, shipping),
    ):
        provider = Dependent(lambda instance=instance: instance, scope="saga")
        container.bind(di.bind_by_type(provider, service_type))
    return container


# -- the database ------------------------------------------------------------------------------


def table_names() -> dict[str, str]:
    return {
        "executions_table": os.environ.get("SAGAKIT_EXECUTIONS_TABLE", "saga_executions"),
        "logs_table": os.environ.get("SAGAKIT_LOGS_TABLE", "saga_logs"),
    }


async def report(storage: SqlAlchemySagaStorage, saga_id: uuid.UUID) -> None:
    """Print what the database holds about one saga."""
    saga = await storage.get_saga(saga_id)
    print(
        f"Saga {saga.name} {saga.saga_id}: status={saga.status.value} version={saga.version} "
        f"recovery_attempts={saga.recovery_attempts} lease_owner={saga.lease_owner or '-'}"
    )
    print(f"  context: {json.dumps(saga.context, sort_keys=True)}")
    for number, entry in enumerate(await storage.get_step_history(saga_id), start=1):
        line = f"  {number}. {entry.step_name} {entry.action.value} {entry.status.value}"
        if entry.details:
            line += f" ({entry.details})"
        print(line)


async def main(url: str) -> None:
    print(f"Database: {make_url(url).render_as_string(hide_password=True)}")
    storage = SqlAlchemySagaStorage.from_url(url, **table_names())
    await storage.create_schema()  # idempotent; use sagakit.migrations.upgrade() in production
    inventory = InventoryService()
    payments = PaymentService()
    shipping = ShippingService(unreachable={"Atlantis"})
    mediator = bootstrap.bootstrap(
        di_container=build_container(inventory, payments, shipping),
        sagas_mapper=saga_mapper,
        saga_storage=storage,
        compensation_retry_delay=0.1,
    )

    try:
        print("== Scenario 1: the order goes through ==")
        first = uuid.uuid4()
        context = OrderContext(order_id="123", items=["item_1"], total_amount=100.0)
        async for step_result in mediator.stream(context, saga_id=first):
            print(f"Step completed: {step_result.step_type.__name__} "
                  f"({step_result.response.message})")

        print("== Scenario 2: shipping fails, earlier steps are compensated ==")
        second = uuid.uuid4()
        context = OrderContext(
            order_id="456", items=["item_2"], total_amount=42.5, shipping_address="Atlantis"
        )
        try:
            async for step_result in mediator.stream(context, saga_id=second):
                print(f"Step completed: {step_result.step_type.__name__}")
        except RuntimeError as exc:
            print(f"Saga failed: {exc}")
        print(f"Stock after rollback: {inventory.stock}")
        print(f"Payments still charged: {sorted(payments.charged)}")
    finally:
        await storage.close()

    # A second storage object with its own engine: what follows comes from the database only.
    print("== Stored state, read back from the database ==")
    reader = SqlAlchemySagaStorage.from_url(url, **table_names())
    try:
        await report(reader, first)
        await report(reader, second)
    finally:
        await reader.close()


def database_url(argv: list[str]) -> str | None:
    if len(argv) > 1:
        return argv[1]
    return os.environ.get("SAGAKIT_DATABASE_URL") or None


if __name__ == "__main__":
    given = database_url(sys.argv)
    if given is not None:
        asyncio.run(main(given))
    else:
        with tempfile.TemporaryDirectory(prefix="sagakit-example-") as directory:
            asyncio.run(main(f"sqlite+aiosqlite:///{Path(directory) / 'sagas.db'}"))
