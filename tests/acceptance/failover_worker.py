"""The worker process of the failover tests (tests/acceptance/test_failover.py).

``SAGAKIT_FAILOVER_DIR=DIR python -m tests.acceptance.failover_worker URL PREFIX`` runs a :class:`sagakit.RecoveryWorker`
serving the ``failover`` queue of the tables named ``PREFIX_*`` with a one-hour lease, so that
only liveness (or a release) can hand its sagas to another worker in a test's time, until
SIGTERM (graceful: exit 0) or SIGKILL.

:class:`HoldSaga` has two steps. ``Hold`` writes ``DIR/hold-<pid>-<n>`` when its act starts, then
waits until ``DIR/go`` exists; ``Finish`` writes ``DIR/finish-<pid>-<n>``. The test reads these
files to tell which process ran which act, and how often.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import sys
from pathlib import Path

from sagakit import RecoveryOptions, RecoveryWorker, Saga, SagaContext, SagaStepHandler
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

QUEUE = "failover"
LEASE = 3600.0
_DIR = Path(os.environ.get("SAGAKIT_FAILOVER_DIR", "."))
_count = itertools.count(1)


@dataclasses.dataclass
class HoldContext(SagaContext):
    order: str = "o-1"


def _mark(what: str) -> None:
    (_DIR / f"{what}-{os.getpid()}-{next(_count)}").write_text("")


class Hold(SagaStepHandler[HoldContext, None]):
    async def act(self, context: HoldContext) -> None:
        _mark("hold")
        while not (_DIR / "go").exists():  # noqa: ASYNC110 (another process writes it)
            await asyncio.sleep(0.02)

    async def compensate(self, context: HoldContext) -> None:
        _mark("undo")


class Finish(SagaStepHandler[HoldContext, None]):
    async def act(self, context: HoldContext) -> None:
        _mark("finish")

    async def compensate(self, context: HoldContext) -> None:
        _mark("undo")


class HoldSaga(Saga[HoldContext]):
    steps = [Hold, Finish]


def tables(prefix: str) -> dict[str, str]:
    return {"executions_table": f"{prefix}_x", "logs_table": f"{prefix}_l",
            "queues_table": f"{prefix}_q"}


def worker(storage: SqlAlchemySagaStorage) -> RecoveryWorker:
    """A worker as the tests run them, in this process or a child."""
    return RecoveryWorker(storage, [HoldSaga], queues=[QUEUE], poll_interval=0.1,
                          options=RecoveryOptions(lease_seconds=LEASE), shutdown_timeout=60)


async def _main(url: str, prefix: str) -> None:
    storage = SqlAlchemySagaStorage.from_url(url, **tables(prefix))
    try:
        await worker(storage).run()
    finally:
        await storage.close()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2]))
