"""The processes of the paused-worker test (tests/acceptance/test_paused_worker.py).

``python -m tests.acceptance.paused_worker run ...`` starts the example's order saga
(examples/fencing_service.py: charge through the payment service, then ship to Atlantis, which
fails) and freezes in its ChargeCard step right before the charge goes out, after writing the
``--marker`` file:

- ``--freeze in_call``: in synchronous code (a long GC pause, say), until the ``--go`` file
  exists; then the charge goes out at once, with this run's token;
- ``--freeze awaiting``: in an ``await`` that never returns (a response that never comes).

The test stops the process there with SIGSTOP, lets its lease run out, runs
``python -m tests.acceptance.paused_worker recover ...`` (recover_saga in a second process: it
charges, fails to ship and refunds), then continues the first with SIGCONT.

Each process prints what happened: ``step: cancelled`` when its step was cancelled, ``step:
refused <error>`` when the service refused its charge, and at the end ``outcome: <status>`` or
``outcome: <error type>`` (with ``cause:``/``context:`` lines naming the chained errors).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from sagakit import SagaError, recover_saga
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fencing_service.py"


def example() -> ModuleType:
    """examples/fencing_service.py as the module ``fencing_service``."""
    module = sys.modules.get("fencing_service")
    if module is None:
        spec = importlib.util.spec_from_file_location("fencing_service", EXAMPLE)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["fencing_service"] = module  # before running it: dataclasses look it up
        spec.loader.exec_module(module)
    return module


def storage_for(args: argparse.Namespace) -> SqlAlchemySagaStorage:
    return SqlAlchemySagaStorage.from_url(
        args.url, executions_table=args.executions, logs_table=args.logs)


def frozen_in_call(marker: Path, go: Path) -> Any:
    async def pause() -> None:  # never suspends: the charge follows without a loop turn
        arrived(marker, "step: frozen in synchronous code")
        block_until(go)

    return pause


def frozen_awaiting(marker: Path) -> Any:
    async def pause() -> None:
        arrived(marker, "step: awaiting a response")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            print("step: cancelled", flush=True)
            raise

    return pause


def arrived(marker: Path, message: str) -> None:
    marker.write_text("in ChargeCard")
    print(message, flush=True)


def block_until(go: Path) -> None:
    """Synchronous code that holds the event loop (as a GC pause or CPU-bound code would)
    until the test lets it go on."""
    while not go.exists():
        time.sleep(0.01)


class Refusals:
    """A container wrapper printing a refusal of the payment service before it propagates."""

    def __init__(self, build: Any) -> None:
        self.build = build

    def __call__(self, step_type: type[Any]) -> Any:
        step = self.build(step_type)
        act = step.act

        async def reporting(context: Any) -> Any:
            try:
                return await act(context)
            except example().RequestRefused as exc:
                print(f"step: refused {type(exc).__name__}: {exc}", flush=True)
                raise

        step.act = reporting
        return step


async def run(args: argparse.Namespace) -> None:
    fencing = example()
    payments = fencing.PaymentService(args.payments)
    if args.freeze == "in_call":
        pause = frozen_in_call(Path(args.marker), Path(args.go))
    else:
        pause = frozen_awaiting(Path(args.marker))
    storage = storage_for(args)
    try:
        transaction = fencing.OrderSaga().transaction(
            context=fencing.Order(args.order, 4990, address="Atlantis"), storage=storage,
            saga_id=uuid.UUID(args.saga_id), lease_seconds=args.lease,
            container=Refusals(fencing.steps_for(payments, pause=pause)),
        )
        await report(transaction.run())
    finally:
        await storage.close()


async def recover(args: argparse.Namespace) -> None:
    fencing = example()
    payments = fencing.PaymentService(args.payments)
    storage = storage_for(args)
    try:
        await report(recover_saga(
            fencing.OrderSaga, uuid.UUID(args.saga_id),
            container=Refusals(fencing.steps_for(payments)), storage=storage,
            lease_seconds=args.lease, compensation_retry_delay=0.0,
        ))
    finally:
        await storage.close()


async def report(outcome: Any) -> None:
    try:
        status = await outcome
    except SagaError as exc:
        print(f"outcome: {type(exc).__name__}: {exc}", flush=True)
        for label, chained in (("cause", exc.__cause__), ("context", exc.__context__)):
            if chained is not None:
                print(f"{label}: {type(chained).__name__}: {chained}", flush=True)
    else:
        print(f"outcome: {status.value}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.acceptance.paused_worker")
    parser.add_argument("command", choices=["run", "recover"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--executions", required=True)
    parser.add_argument("--logs", required=True)
    parser.add_argument("--payments", required=True, help="the payment service's SQLite file")
    parser.add_argument("--saga-id", required=True)
    parser.add_argument("--order", default="order-1")
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--freeze", choices=["in_call", "awaiting"], default="awaiting")
    parser.add_argument("--marker", help="written when the step is about to freeze")
    parser.add_argument("--go", help="in_call: the step goes on once this file exists")
    args = parser.parse_args(argv)
    asyncio.run(run(args) if args.command == "run" else recover(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
