"""Recovering one saga after a crash, by id, with recover_saga.

A saga's worker "crashes" in the middle of a step (simulated here by cancelling its task, which
leaves the saga at its last checkpoint exactly like a dead process would, minus the lease), then
``recover_saga`` finishes it: completed steps are skipped, the interrupted one runs again.
A second saga fails and crashes during compensation; recovery finishes the compensation and
returns FAILED — a normal return, not an error.

Run: ``python examples/saga_recovery.py [DATABASE_URL]`` (default: a SQLite file in a temp dir).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import tempfile

from sagakit import Saga, SagaContext, SagaStepHandler, recover_saga
from sagakit.storage import SqlAlchemySagaStorage

calls: list[str] = []
crash_in: set[str] = set()


class Crash(BaseException):
    """Stands for the process dying (a BaseException: no compensation runs)."""


@dataclasses.dataclass
class TransferContext(SagaContext):
    transfer_id: str
    amount: int
    debited: bool = False
    credited: bool = False


class Debit(SagaStepHandler[TransferContext, None]):
    async def act(self, context: TransferContext) -> None:
        calls.append("debit")
        context.debited = True

    async def compensate(self, context: TransferContext) -> None:
        calls.append("refund debit")
        if "refund debit" in crash_in:
            crash_in.discard("refund debit")
            raise Crash
        context.debited = False


class Credit(SagaStepHandler[TransferContext, None]):
    async def act(self, context: TransferContext) -> None:
        calls.append("credit")
        if "credit" in crash_in:
            crash_in.discard("credit")
            raise Crash
        if context.amount > 1000:
            raise ValueError("amount over the limit")
        context.credited = True

    async def compensate(self, context: TransferContext) -> None:
        calls.append("reverse credit")
        context.credited = False


class TransferSaga(Saga[TransferContext]):
    steps = [Debit, Credit]


async def crash_then_recover(storage: SqlAlchemySagaStorage, context: TransferContext) -> None:
    transaction = TransferSaga().transaction(context=context, storage=storage,
                                             compensation_retry_delay=0)
    try:
        await transaction.run()
    except Crash:
        state = await storage.get_saga(transaction.saga_id)
        print(f"  crashed: status={state.status.value} calls so far={calls}")
    except ValueError as error:
        print(f"  failed: {error}")
    status = await recover_saga(TransferSaga(), transaction.saga_id, TransferContext, None, storage)
    final = await storage.get_saga(transaction.saga_id)
    print(f"  recover_saga -> {status.value}; context={final.context}; calls={calls}")


async def main(url: str) -> None:
    storage = SqlAlchemySagaStorage.from_url(url)
    await storage.create_schema()
    print("1. crash during forward execution (in Credit), then recovery:")
    crash_in.add("credit")
    await crash_then_recover(storage, TransferContext("t-1", 100))
    calls.clear()
    print("2. a failing step, then a crash during compensation, then recovery:")
    crash_in.add("refund debit")
    transaction = TransferSaga().transaction(context=TransferContext("t-2", 5000),
                                             storage=storage, compensation_retry_delay=0)
    try:
        await transaction.run()
    except Crash:
        state = await storage.get_saga(transaction.saga_id)
        print(f"  crashed while compensating: status={state.status.value} calls={calls}")
    status = await recover_saga(TransferSaga(), transaction.saga_id, TransferContext, None, storage)
    final = await storage.get_saga(transaction.saga_id)
    print(f"  recover_saga -> {status.value}; context={final.context}; calls={calls}")
    await storage.close()


if __name__ == "__main__":
    default = f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='sagakit-')}/recovery.db"
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else default))
