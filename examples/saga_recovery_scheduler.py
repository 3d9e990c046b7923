"""Running the recovery worker: it finds interrupted sagas and finishes them.

This script first leaves a few sagas interrupted (their runs are cut off mid-step), then runs a
:class:`sagakit.RecoveryWorker` in the foreground. Start as many of these workers as you like, on
as many machines, against one database: each saga is leased to exactly one of them at a time.
SIGTERM or Ctrl-C stops the worker gracefully (each saga in hand stops at its next checkpoint).

Run: ``python examples/saga_recovery_scheduler.py [DATABASE_URL] [--forever]``.
Without ``--forever`` the worker stops once nothing is left to recover.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import tempfile

from sagakit import (
    RecoveryOptions,
    RecoveryWorker,
    Saga,
    SagaContext,
    SagaStatus,
    SagaStepHandler,
)
from sagakit.storage import SqlAlchemySagaStorage


class Crash(BaseException):
    """Stands for a process dying mid-step."""


@dataclasses.dataclass
class SignupContext(SagaContext):
    email: str
    account_created: bool = False
    welcome_sent: bool = False


class CreateAccount(SagaStepHandler[SignupContext, None]):
    async def act(self, context: SignupContext) -> None:
        context.account_created = True

    async def compensate(self, context: SignupContext) -> None:
        context.account_created = False


class SendWelcome(SagaStepHandler[SignupContext, None]):
    crash = True

    async def act(self, context: SignupContext) -> None:
        if SendWelcome.crash:
            raise Crash
        context.welcome_sent = True

    async def compensate(self, context: SignupContext) -> None:
        context.welcome_sent = False


class SignupSaga(Saga[SignupContext]):
    steps = [CreateAccount, SendWelcome]


async def main(url: str, forever: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    storage = SqlAlchemySagaStorage.from_url(url)
    await storage.create_schema()
    for n in range(3):
        with contextlib.suppress(Crash):
            await SignupSaga().transaction(
                context=SignupContext(f"user{n}@example.com"), storage=storage
            ).run()
    print("interrupted:", len(await storage.get_sagas_for_recovery(100)), "sagas")
    SendWelcome.crash = False  # the "bug" is fixed; the worker can finish them
    worker = RecoveryWorker(
        storage, [SignupSaga], concurrency=4, poll_interval=0.5,
        options=RecoveryOptions(lease_seconds=30.0, max_recovery_attempts=5),
    )
    if forever:
        await worker.run()  # until SIGTERM / Ctrl-C
    else:
        while await worker.run_once():
            pass
    done = await storage.list_sagas(statuses=frozenset({SagaStatus.COMPLETED}))
    print("completed:", len(done), "sagas;",
          "left to recover:", len(await storage.get_sagas_for_recovery(100)))
    await storage.close()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--forever"]
    default = f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='sagakit-')}/worker.db"
    asyncio.run(main(args[0] if args else default, "--forever" in sys.argv))
