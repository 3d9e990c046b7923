"""The README demo: a real saga on the embedded SQLite default, a crash, and a recovery.

1. A worker process starts an order saga (reserve stock, charge card, ship, notify) on a SQLite
   file and is killed with SIGKILL while the "ship" step is running.
2. The saga row survives the crash: RUNNING, two steps checkpointed, leased by the dead worker.
3. Once the dead worker's lease expires, recovery finishes the saga: the two checkpointed steps
   are not run again; "ship" runs again (its completion was never checkpointed) and the saga
   completes.

The database is kept (in a new temporary directory, or ``--db PATH``), and the demo ends by
saying where it is and which commands to try on it; ``--discard`` deletes it instead.

Run: ``sagakit demo``, ``python -m sagakit.demo`` or ``python examples/demo.py``. The worker
process is ``python -m sagakit.demo --worker DB SAGA_ID``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from sagakit import Saga, SagaContext, SagaStatus, SagaStepHandler, recover_saga
from sagakit.storage import SqlAlchemySagaStorage

LEASE_SECONDS = 2.0


@dataclasses.dataclass
class OrderContext(SagaContext):
    order_id: str
    amount_cents: int
    reservation_id: str | None = None
    payment_id: str | None = None
    tracking_number: str | None = None


def say(text: str) -> None:
    print(text, flush=True)


class ReserveStock(SagaStepHandler[OrderContext, str]):
    async def act(self, context: OrderContext) -> str:
        context.reservation_id = f"res-{context.order_id}"
        say(f"  [pid {os.getpid()}] reserve stock   -> {context.reservation_id}")
        return context.reservation_id

    async def compensate(self, context: OrderContext) -> None:
        say(f"  [pid {os.getpid()}] release stock   {context.reservation_id}")


class ChargeCard(SagaStepHandler[OrderContext, str]):
    async def act(self, context: OrderContext) -> str:
        context.payment_id = f"pay-{context.order_id}"
        say(f"  [pid {os.getpid()}] charge card     -> {context.payment_id} "
            f"(idempotency key {self.idempotency_key})")
        return context.payment_id

    async def compensate(self, context: OrderContext) -> None:
        say(f"  [pid {os.getpid()}] refund card     {context.payment_id}")


class ShipOrder(SagaStepHandler[OrderContext, str]):
    async def act(self, context: OrderContext) -> str:
        say(f"  [pid {os.getpid()}] ship order      ... (slow courier API)")
        if os.environ.get("SAGAKIT_DEMO_SLOW_SHIP"):
            await asyncio.sleep(60)  # the demo kills the worker here
        context.tracking_number = f"trk-{context.order_id}"
        say(f"  [pid {os.getpid()}] ship order      -> {context.tracking_number}")
        return context.tracking_number

    async def compensate(self, context: OrderContext) -> None:
        say(f"  [pid {os.getpid()}] cancel shipment {context.tracking_number}")


class NotifyCustomer(SagaStepHandler[OrderContext, None]):
    async def act(self, context: OrderContext) -> None:
        say(f"  [pid {os.getpid()}] email customer  order {context.order_id} is on its way")

    async def compensate(self, context: OrderContext) -> None:
        say(f"  [pid {os.getpid()}] email customer  order {context.order_id} was cancelled")


class OrderSaga(Saga[OrderContext]):
    steps = [ReserveStock, ChargeCard, ShipOrder, NotifyCustomer]


def _url(db: Path) -> str:
    return f"sqlite+aiosqlite:///{db}"


async def worker(db: Path, saga_id: uuid.UUID) -> None:
    """The process that gets killed: runs the saga from the start."""
    storage = SqlAlchemySagaStorage.from_url(_url(db))
    context = OrderContext(order_id="A-1001", amount_cents=4_990)
    async for result in OrderSaga().transaction(
        context=context, storage=storage, saga_id=saga_id, lease_seconds=LEASE_SECONDS
    ):
        say(f"  [pid {os.getpid()}] checkpoint: {result.step_name} completed")


async def show(storage: SqlAlchemySagaStorage, saga_id: uuid.UUID) -> None:
    state = await storage.get_saga(saga_id)
    say(f"  status={state.status.value} version={state.version} "
        f"lease_owner={state.lease_owner or '-'}")
    for entry in await storage.get_step_history(saga_id):
        say(f"    {entry.step_name:<15} {entry.action.value:<10} {entry.status.value}")


async def run(db: Path, saga_id: uuid.UUID) -> int:
    """The demo itself, on the SQLite database ``db`` (created if missing)."""
    storage = SqlAlchemySagaStorage.from_url(_url(db))
    await storage.create_schema()

    say(f"1. a worker runs saga {saga_id} on {db}")
    env = {**os.environ, "SAGAKIT_DEMO_SLOW_SHIP": "1"}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sagakit.demo", "--worker", str(db), str(saga_id),
        stdout=asyncio.subprocess.PIPE, env=env,
    )
    assert child.stdout is not None
    while line := (await child.stdout.readline()).decode():
        print(line, end="", flush=True)
        if "ship order      ..." in line:
            break
    child.send_signal(signal.SIGKILL)
    await child.wait()
    say(f"   ... worker killed with SIGKILL (exit {child.returncode}) in the middle of ShipOrder")

    say("2. what survived the crash:")
    await show(storage, saga_id)

    say(f"3. recovery, once the dead worker's {LEASE_SECONDS:.0f}s lease has expired:")
    await _until_due(storage)
    status = await recover_saga(OrderSaga(), saga_id, OrderContext, None, storage)
    say(f"   recover_saga returned {status.value}")
    await show(storage, saga_id)
    final = await storage.get_saga(saga_id)
    say(f"   final context: {final.context}")
    await storage.close()
    return 0 if status is SagaStatus.COMPLETED else 1


async def _until_due(storage: SqlAlchemySagaStorage) -> None:
    while True:
        if await storage.get_sagas_for_recovery(limit=10):
            return
        await asyncio.sleep(0.2)

def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo (or, with ``--worker DB SAGA_ID``, the worker it kills); return the exit
    code: 0 when recovery completed the saga."""
    parser = argparse.ArgumentParser(prog="sagakit demo", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("DB", "SAGA_ID"), help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, metavar="PATH",
                        help="the SQLite file to use (default: sagas.db in a new temporary "
                             "directory)")
    parser.add_argument("--discard", action="store_true",
                        help="delete the database at the end instead of keeping it")
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)  # the default
    args = parser.parse_args(argv)
    if args.worker:
        asyncio.run(worker(Path(args.worker[0]), uuid.UUID(args.worker[1])))
        return 0
    db = (args.db or Path(tempfile.mkdtemp(prefix="sagakit-demo-")) / "sagas.db").absolute()
    try:
        saga_id = uuid.uuid4()
        code = asyncio.run(run(db, saga_id))
    finally:
        if args.discard:
            for path in (db, db.with_name(db.name + "-journal"), db.with_name(db.name + "-wal")):
                path.unlink(missing_ok=True)
            if args.db is None:
                shutil.rmtree(db.parent, ignore_errors=True)
    if not args.discard:
        _next_steps(db, saga_id)
    return code


def _next_steps(db: Path, saga_id: uuid.UUID) -> None:
    say(f"""
The database is kept: {db}
Try:
  export SAGAKIT_DATABASE_URL={_url(db)}
  sagakit list                # every saga and its status
  sagakit show {saga_id}      # its context and step log
  sagakit diagram {saga_id} --saga sagakit.demo:OrderSaga
                              # what ran and what was retried, as a Mermaid diagram
  sagakit demo --discard      # next time: delete the database at the end""")


if __name__ == "__main__":
    sys.exit(main())
