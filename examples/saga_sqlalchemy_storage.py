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
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

# The saga itself -- context, steps, services, DI wiring -- is the one of examples/saga.py.
from saga import (
    InventoryService,
    OrderContext,
    PaymentService,
    ShippingService,
    build_container,
    saga_mapper,
)
from sqlalchemy.engine import make_url

from sagakit import bootstrap
from sagakit.storage import SqlAlchemySagaStorage

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
