"""The saga the queue-workers test submits, and the worker process that serves its queues.

``python -m tests.acceptance.queue_runner --url ... --prefix ... --label w3`` runs a
:class:`sagakit.RecoveryWorker` serving the queues of :data:`QUEUES` until SIGTERM (graceful
shutdown) or SIGKILL; see :mod:`tests.acceptance.queue_harness` for the orchestration.

:class:`QueuedSaga` has three steps that never fail. Each act writes, into the events table
of :mod:`tests.acceptance.eventlog` (committed at once, so it survives a SIGKILL):

- a ``start`` event with the saga's committed row and log as one SELECT saw them (the
  snapshot: status and lease owner);
- an ``end`` event (``ok``, or ``error:<type>`` when the act was cut off), unless the process
  died first.

Both are labelled ``<process label>/<n>``: the process, and which run of a saga in that process
the act belongs to (:class:`RunMarker` numbers the runs), so the checker tells runs apart, two
runs of one saga in one process included.

An act sleeps a few milliseconds between its two events. A compensation never runs (no act
fails); should one, it writes an ``anomaly`` event, which the checker reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import itertools
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sagakit import (
    RecoveryOptions,
    RecoveryWorker,
    Saga,
    SagaContext,
    SagaRun,
    SagaStepHandler,
    StepInvocation,
    current_invocation,
)
from sagakit.queue import QueueSettings
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.acceptance.eventlog import EventLog, TableNames
from tests.acceptance.procs import add_child_arguments, serve, start_child

__all__ = ["QUEUES", "STEP_NAMES", "QueueContext", "QueuedSaga", "RunMarker", "open_storage"]

QUEUES: tuple[QueueSettings, ...] = (
    QueueSettings("orders", concurrency=6, key_concurrency=1),
    QueueSettings("emails", concurrency=3),
    QueueSettings("reports", key_concurrency=2),
)
"""The queues and their limits: a global limit with a per-key limit, a global limit alone, a
per-key limit alone."""

STEP_NAMES = ("Prepare", "Perform", "Confirm")


def open_storage(url: str, prefix: str) -> SqlAlchemySagaStorage:
    """The storage over the run's tables (``<prefix>_exec``, ``_logs``, ``_queues``)."""
    names = TableNames.for_prefix(prefix)
    return SqlAlchemySagaStorage.from_url(
        url, executions_table=names.executions, logs_table=names.logs,
        queues_table=f"{prefix}_queues")


@dataclasses.dataclass
class QueueContext(SagaContext):
    queue: str = ""
    key: str | None = None
    step_ms: int = 6
    done: list[str] = dataclasses.field(default_factory=list)


_LOG: EventLog | None = None
_RUN: contextvars.ContextVar[int] = contextvars.ContextVar("queue_run", default=0)
_RUNS = itertools.count(1)


def _log() -> EventLog:
    if _LOG is None:
        raise RuntimeError("no event log installed in this process")
    return _LOG


class RunMarker:
    """A middleware that numbers the runs of sagas in this process: the acts of one run write
    its number in the label of their events."""

    async def __call__(self, invocation: StepInvocation,
                       call_next: Callable[[StepInvocation], Awaitable[Any]]) -> Any:
        return await call_next(invocation)

    @contextlib.asynccontextmanager
    async def observe_saga(self, run: SagaRun) -> AsyncIterator[SagaRun]:
        token = _RUN.set(next(_RUNS))
        try:
            yield run
        finally:
            _RUN.reset(token)


class _Step(SagaStepHandler[QueueContext, str]):
    async def act(self, context: QueueContext) -> str:
        invocation = current_invocation()
        assert invocation is not None
        saga_id, name, log = invocation.saga_id, type(self).__name__, _log()
        label = f"{log.label}/{_RUN.get()}"
        outcome = "ok"
        try:  # a cut-off may land in the start record: end the act all the same
            await log.record(saga_id, name, "act", "start", attempt=invocation.attempt,
                             snapshot=await log.snapshot(saga_id), label=label)
            if name in context.done:
                await log.record(saga_id, name, "act", "anomaly", label=label,
                                 outcome="already in context.done")
            await asyncio.sleep(random.uniform(0.3, 1.0) * context.step_ms / 1000)
            context.done.append(name)
        except BaseException as exc:
            outcome = f"error:{type(exc).__name__}"
            raise
        finally:  # shielded: a cut-off landing here must not lose the end event
            await asyncio.shield(log.record(saga_id, name, "act", "end", outcome=outcome,
                                            attempt=invocation.attempt, label=label))
        return name

    async def compensate(self, context: QueueContext) -> None:
        invocation = current_invocation()
        assert invocation is not None
        await _log().record(invocation.saga_id, type(self).__name__, "compensate", "anomaly",
                            outcome="a compensation ran (no act of this saga fails)")


class Prepare(_Step):
    pass


class Perform(_Step):
    pass


class Confirm(_Step):
    pass


class QueuedSaga(Saga[QueueContext]):
    steps = [Prepare, Perform, Confirm]


def _sabotage(kind: str) -> None:
    """Break sagakit's queue limits on purpose in this process, to prove the checks notice
    (tests only). ``limits``: a claim picks sagas as if its queue had no limits (the free-slot
    count it computes before picking still applies). ``recovery``: the recovery scan
    (``claim_due``, which knows no queue limits) takes queued sagas too (SQLite and
    PostgreSQL)."""
    from sagakit.storage import queries, schema, sqlqueues

    if kind == "limits":
        pick = getattr(sqlqueues, "pick")  # noqa: B009 - a name the module imported

        def unlimited(limits: Any, candidates: Any, **kwargs: Any) -> Any:
            return pick(None, candidates, **kwargs)

        setattr(sqlqueues, "pick", unlimited)  # noqa: B010 - a name the module imported
    elif kind == "recovery":
        setattr(queries, "RECOVERY_SQL", schema.RECOVERABLE_SQL)  # noqa: B010 - likewise
    else:
        raise ValueError(f"unknown sabotage {kind!r}")


async def run_worker(args: argparse.Namespace) -> int:
    global _LOG
    storage = open_storage(args.url, args.prefix)
    _LOG = EventLog(args.url, TableNames.for_prefix(args.prefix), args.label)
    options = RecoveryOptions(max_recovery_attempts=args.max_attempts, lease_seconds=args.lease,
                              backoff=0.0, backoff_max=0.0, middlewares=[RunMarker()])
    worker = RecoveryWorker(storage, [QueuedSaga], concurrency=args.concurrency,
                            poll_interval=args.poll, options=options, shutdown_timeout=10.0,
                            queues=[q.name for q in QUEUES])
    return await serve(worker, args.label, (storage, _LOG), "runs")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.acceptance.queue_runner")
    add_child_arguments(p, lease=2.0, max_attempts=50)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--poll", type=float, default=0.05)
    args = p.parse_args(argv)
    start_child(args, "SAGAKIT_QUEUE_SABOTAGE", _sabotage)
    return asyncio.run(run_worker(args))


if __name__ == "__main__":
    sys.exit(main())
