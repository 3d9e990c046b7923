"""Hand sagas to workers: submit orders to a queue with limits and let two workers run them.

Run: ``python examples/saga_submit_worker.py`` (a SQLite file in a temporary directory; pass a
database URL as the first argument to use another, e.g. PostgreSQL, where the workers are also
woken by LISTEN/NOTIFY).

The "orders" queue runs at most 2 sagas at once across all workers, and at most 1 per customer
(its concurrency key). Six orders of three customers are submitted at once; the submitting code
only waits for the outcomes, and follows one order's step log as the workers write it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import tempfile
from pathlib import Path

from sagakit import (
    QueueSettings,
    RecoveryWorker,
    Saga,
    SagaContext,
    SagaStepHandler,
)
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

RUNNING: dict[str, int] = {}  # what runs now: per queue and per customer (this demo's own count)
MOST: dict[str, int] = {}


@dataclasses.dataclass
class Order(SagaContext):
    order_id: str
    customer: str
    shipped: bool = False


def enter(*labels: str) -> None:
    for label in labels:
        RUNNING[label] = RUNNING.get(label, 0) + 1
        MOST[label] = max(MOST.get(label, 0), RUNNING[label])


def leave(*labels: str) -> None:
    for label in labels:
        RUNNING[label] -= 1


class Reserve(SagaStepHandler[Order, None]):
    async def act(self, context: Order) -> None:
        enter("orders", context.customer)  # the saga's slot is taken from here...
        await asyncio.sleep(0.05)

    async def compensate(self, context: Order) -> None:
        leave("orders", context.customer)


class Ship(SagaStepHandler[Order, None]):
    async def act(self, context: Order) -> None:
        await asyncio.sleep(0.05)
        context.shipped = True
        leave("orders", context.customer)  # ...to here: the saga's last step

    async def compensate(self, context: Order) -> None:
        pass


class OrderSaga(Saga[Order]):
    steps = [Reserve, Ship]


async def main(url: str) -> None:
    storage = SqlAlchemySagaStorage.from_url(url)
    await storage.create_schema()
    await storage.set_queue(QueueSettings("orders", concurrency=2, key_concurrency=1))

    handles = [
        await OrderSaga().submit(Order(f"o-{i}", f"customer-{i % 3}"), storage=storage,
                                 queue="orders", concurrency_key=f"customer-{i % 3}")
        for i in range(6)
    ]
    print(f"submitted {len(handles)} orders; nothing ran yet in this process")

    workers = [RecoveryWorker(storage, [OrderSaga], queues=["orders"], concurrency=4,
                              poll_interval=0.05) for _ in range(2)]
    tasks = [asyncio.create_task(w.run(install_signal_handlers=False)) for w in workers]
    try:
        async for entry in handles[0].steps():
            print(f"o-0: {entry.step_name} {entry.action.value} {entry.status.value}")
        for handle in handles:
            final = await handle.outcome()
            print(f"{final.context['order_id']}: {final.status.value}, "
                  f"shipped={final.context['shipped']}")
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)
        await storage.close()
    customers = max(n for label, n in MOST.items() if label.startswith("customer"))
    print(f"most orders running at once: {MOST['orders']} (limit 2); "
          f"per customer: {customers} (limit 1)")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        asyncio.run(main(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(f"sqlite+aiosqlite:///{Path(tmp) / 'orders.db'}"))
