"""Forward recovery: an order saga that retries, waits and, once the card is charged, only goes
forward.

The saga is ``ReserveStock, ChargeCard (the pivot), ShipOrder``:

- ``ReserveStock`` and ``ChargeCard`` are compensable: until the charge is checkpointed, a step
  that fails for good releases what was done (the card is refunded, the stock released).
- ``ChargeCard`` retries a flaky gateway (``ConnectionError``) a few times, but a declined card
  is a ``PermanentError``: never retried.
- ``ChargeCard`` is the **pivot**: once the card is charged, the saga never compensates.
- ``ShipOrder`` retries with backoff; a wait longer than the saga's ``durable_wait`` is durable:
  the saga is checkpointed WAITING, no process holds it, and a recovery worker continues it when
  the time comes. If shipping still fails when its retries run out, the saga is PARKED for an
  operator, never refunded: ``resume_saga`` after a fix gives the step a fresh budget.

Five scenarios, each printing what happened. Run it with
``python examples/saga_forward_recovery.py``; it keeps its sagas in a temporary SQLite file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import uuid
from pathlib import Path

from sagakit import (
    PermanentError,
    RecoveryOptions,
    RecoveryWorker,
    Retry,
    Saga,
    SagaContext,
    SagaStatus,
    SagaStepHandler,
    Step,
    resume_saga,
)
from sagakit.storage import SqlAlchemySagaStorage


class CardDeclined(PermanentError):
    """The bank said no: asking again will not change its mind."""


@dataclasses.dataclass
class Order(SagaContext):
    order_id: str
    amount: int
    reservation: str | None = None
    payment: str | None = None
    tracking: str | None = None


class World:
    """The services the saga calls (in memory, for the example), with faults to switch on."""

    def __init__(self) -> None:
        self.gateway_blips = 0  # the next charges that fail with ConnectionError
        self.declined = False
        self.courier_failures = 0  # the next shipments that fail
        self.events: list[str] = []

    def note(self, event: str) -> None:
        self.events.append(event)
        print(f"    {event}")


world = World()


class ReserveStock(SagaStepHandler[Order, str]):
    async def act(self, context: Order) -> str:
        context.reservation = f"res-{context.order_id}"
        world.note(f"stock reserved ({context.reservation})")
        return context.reservation

    async def compensate(self, context: Order) -> None:
        world.note(f"stock released ({context.reservation})")


class ChargeCard(SagaStepHandler[Order, str]):
    pivot = True  # once charged, the saga only goes forward
    retry = Retry(attempts=3, delay=0.05, retry_on=(ConnectionError,))
    timeout = 2.0  # an attempt that takes longer fails with StepTimeoutError (and is retried)

    async def act(self, context: Order) -> str:
        if world.declined:
            world.note("card declined")
            raise CardDeclined(f"card declined for {context.order_id}")
        if world.gateway_blips:
            world.gateway_blips -= 1
            world.note("payment gateway: connection reset")
            raise ConnectionError("payment gateway reset the connection")
        context.payment = f"pay-{context.order_id}"
        world.note(f"card charged {context.amount} ({context.payment})")
        return context.payment

    async def compensate(self, context: Order) -> None:
        # Runs only if the charge was not checkpointed yet: before the pivot's checkpoint.
        world.note(f"card refunded ({context.payment})")


class ShipOrder(SagaStepHandler[Order, str]):
    # After the pivot: no compensate needed, but it must be retriable.
    retry = Retry(attempts=4, delay=0.05, backoff=2.0)  # waits 0.05, 0.1, 0.2 s

    async def act(self, context: Order) -> str:
        if world.courier_failures:
            world.note("courier: no answer")
            world.courier_failures -= 1
            raise ConnectionError("courier did not answer")
        context.tracking = f"trk-{context.order_id}"
        world.note(f"shipped ({context.tracking})")
        return context.tracking


class OrderSaga(Saga[Order]):
    steps = [ReserveStock, ChargeCard, ShipOrder]
    durable_wait = 0.5  # waits longer than this hold no process: the saga rests WAITING


class PatientOrderSaga(Saga[Order]):
    """The same steps; in this saga only, shipping waits a whole second between attempts."""

    steps = [ReserveStock, ChargeCard, Step(ShipOrder, retry=Retry(attempts=3, delay=1.0))]
    durable_wait = 0.5


async def scenario(title: str, storage: SqlAlchemySagaStorage, order: Order,
                   saga: type[Saga[Order]] = OrderSaga) -> uuid.UUID:
    print(f"== {title}")
    transaction = saga().transaction(context=order, storage=storage)
    try:
        status = await transaction.run()
    except Exception as error:  # the step's own error, after compensation (or parking)
        status = transaction.status
        print(f"    the saga raised {type(error).__name__}: {error}")
    print(f"    saga status: {status}")
    return transaction.saga_id


async def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite+aiosqlite:///{Path(directory) / 'orders.db'}"
        storage = SqlAlchemySagaStorage.from_url(url)
        await storage.create_schema()
        try:
            await run_scenarios(storage)
        finally:
            await storage.close()


async def run_scenarios(storage: SqlAlchemySagaStorage) -> None:
    world.gateway_blips = 2
    await scenario("Scenario 1: the gateway blips twice, the third attempt charges", storage,
                   Order("o-1", 30))

    world.declined = True
    await scenario("Scenario 2: the card is declined: no retry, the stock is released",
                   storage, Order("o-2", 40))
    world.declined = False

    world.courier_failures = 2
    await scenario("Scenario 3: the courier fails twice after the charge: retried, shipped",
                   storage, Order("o-3", 50))

    world.courier_failures = 10
    parked = await scenario(
        "Scenario 4: the courier keeps failing past the pivot: parked, never refunded",
        storage, Order("o-4", 60))
    world.courier_failures = 0  # an operator deploys a fix...
    status = await resume_saga(OrderSaga, parked, storage=storage)
    print(f"    resumed after the fix: {status}")

    world.courier_failures = 1
    waiting = await scenario(
        "Scenario 5: a wait longer than durable_wait holds no process: a worker finishes it",
        storage, Order("o-5", 70), PatientOrderSaga)
    worker = RecoveryWorker(storage, [PatientOrderSaga], poll_interval=0.1,
                            options=RecoveryOptions(lease_seconds=5))
    task = asyncio.create_task(worker.run(install_signal_handlers=False))
    while (await storage.get_saga(waiting)).status is not SagaStatus.COMPLETED:
        await asyncio.sleep(0.1)
    worker.stop()
    await task
    print(f"    the worker resumed it when its wait was over: "
          f"{(await storage.get_saga(waiting)).status}")


if __name__ == "__main__":
    asyncio.run(main())
