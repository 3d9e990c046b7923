"""The processes the crash-injection harness starts (and kills).

``python -m tests.acceptance.runner saga ...`` starts the given sagas (one SagaTransaction each,
concurrently, with the chosen saga ids, CrashSaga or ForwardSaga as each one's plan says) and
exits when they are done (a saga at a durable wait is done for its runner: a worker continues
it).

``python -m tests.acceptance.runner worker ...`` runs a :class:`sagakit.RecoveryWorker` serving
both definitions until SIGTERM (graceful shutdown) or SIGKILL.

Both run :class:`~tests.acceptance.crashsaga.CrashObserver` as middleware (it fires the
``waiting:k`` crash points).

Both write step events through :class:`tests.acceptance.crashsaga.EventLog` (over ``--url``,
also when sagakit's storage connects through a faulty link, ``--storage-url``); see
:mod:`tests.acceptance.harness` for the orchestration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from sagakit import RecoveryOptions, RecoveryWorker, RetryPolicy, SagaError, SagaTransaction
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.acceptance.crashsaga import (
    DEFINITIONS,
    CompensationFailed,
    CrashContext,
    CrashObserver,
    StepFailed,
    Transient,
    install,
)
from tests.acceptance.eventlog import EventLog, TableNames
from tests.acceptance.procs import add_child_arguments, serve, start_child


def _storage(args: argparse.Namespace) -> SqlAlchemySagaStorage:
    names = TableNames.for_prefix(args.prefix)
    return SqlAlchemySagaStorage.from_url(
        args.storage_url or args.url, executions_table=names.executions, logs_table=names.logs,
        group_commit=args.group_commit,
    )


def _events(args: argparse.Namespace) -> EventLog:
    log = EventLog(args.url, TableNames.for_prefix(args.prefix), args.label)
    install(log)
    return log


async def run_sagas(args: argparse.Namespace) -> int:
    plan: dict[str, dict[str, Any]] = args.plan_data
    storage, events = _storage(args), _events(args)

    async def one(saga_id: str) -> None:
        await asyncio.sleep(random.uniform(0, args.stagger))
        config = plan[saga_id]
        transaction = SagaTransaction(
            saga=DEFINITIONS[config["definition"]](), context=CrashContext.from_dict(config),
            storage=storage, saga_id=uuid.UUID(saga_id), lease_seconds=args.lease,
            compensation_retry_count=args.retry, compensation_retry_delay=0.0,
            max_recovery_attempts=args.max_attempts, middlewares=[CrashObserver()],
        )
        try:
            status = await transaction.run()
        except (StepFailed, CompensationFailed, Transient) as exc:
            print(f"{saga_id} {type(exc).__name__} -> {transaction.status}", flush=True)
        except SagaError as exc:  # lease lost, busy, parked, storage trouble: recovery finishes
            print(f"{saga_id} {type(exc).__name__}: {exc}", flush=True)
        else:
            print(f"{saga_id} {status}", flush=True)

    try:
        await asyncio.gather(*(one(i) for i in args.ids.split(",")))
    finally:
        await storage.close()
        await events.close()
    return 0


async def run_worker(args: argparse.Namespace) -> int:
    storage, events = _storage(args), _events(args)
    options = RecoveryOptions(
        max_recovery_attempts=args.max_attempts, lease_seconds=args.lease,
        retry=RetryPolicy(attempts=args.retry, delay=0.0), backoff=0.0, backoff_max=0.0,
        middlewares=[CrashObserver()],
    )
    worker = RecoveryWorker(storage, DEFINITIONS.values(), concurrency=args.concurrency,
                            poll_interval=args.poll, options=options, shutdown_timeout=10.0)
    return await serve(worker, args.label, (storage, events), "recoveries")


def _sabotage(kind: str) -> None:
    """Break sagakit on purpose in this process, to prove the harness notices (tests only).

    ``rerun``: recovery re-runs the last checkpointed step. ``order``: compensations run in
    forward order. ``steal``: workers list and claim sagas whatever their lease says.
    ``pivot``: a step that fails for good compensates even past the pivot. ``early``: the
    next attempt of a failed step comes at once (the wait is recorded as 0 seconds).
    """
    from sagakit import attempts, execution, plan, resumption
    from sagakit.storage import queries, sqlalchemy

    if kind == "rerun":
        decide = resumption.decide  # type: ignore[attr-defined]

        def rerun(*args: Any, **kwargs: Any) -> Any:
            p = decide(*args, **kwargs)
            if isinstance(p, plan.Forward) and p.start > 0:
                return plan.Forward(p.start - 1, p.completed[:-1])
            return p

        resumption.decide = rerun  # type: ignore[attr-defined]
    elif kind == "order":
        backward = execution.Execution._backward

        async def forward_order(self: Any, to_compensate: Any) -> None:
            await backward(self, tuple(reversed(to_compensate)))

        execution.Execution._backward = forward_order  # type: ignore[method-assign]
    elif kind == "pivot":

        async def compensate_anyway(self: Any, exc: Exception, completed: Any) -> None:
            await self._fail_and_compensate(exc, completed)

        execution.Execution._give_up = compensate_anyway  # type: ignore[method-assign]
    elif kind == "early":
        after_failure = attempts.after_failure  # type: ignore[attr-defined]

        def no_wait(*args: Any, **kwargs: Any) -> Any:
            decision = after_failure(*args, **kwargs)
            if isinstance(decision, plan.RetryAfter):
                return plan.RetryAfter(0.0, decision.durable)
            return decision

        attempts.after_failure = no_wait  # type: ignore[attr-defined]
    elif kind == "steal":
        claim = queries.Queries.claim

        async def steal(self: Any, conn: Any, saga_id: Any, *args: Any) -> Any:
            t = self.t
            await conn.execute(sa.update(t).where(t.c.saga_id == saga_id)
                               .values(lease_owner=None, lease_expires_at=None))
            return await claim(self, conn, saga_id, *args)

        async def everything(self: Any, limit: int, *args: Any, **kwargs: Any) -> list[Any]:
            t = self.tables.executions
            async with self.single() as conn:
                rows = await conn.execute(sa.select(t.c.saga_id).where(
                    t.c.status.in_(["RUNNING", "COMPENSATING", "WAITING"])).limit(limit))
                return [r[0] for r in rows]

        claim_due = queries.Queries.claim_due

        async def steal_due(self: Any, conn: Any, *args: Any) -> Any:
            t = self.t
            await conn.execute(sa.update(t).where(t.c.status.in_(["RUNNING", "COMPENSATING"]))
                               .values(lease_owner=None, lease_expires_at=None))
            return await claim_due(self, conn, *args)

        queries.Queries.claim = steal  # type: ignore[method-assign,assignment]
        queries.Queries.claim_due = steal_due  # type: ignore[method-assign,assignment]
        sqlalchemy.SqlAlchemySagaStorage.get_sagas_for_recovery = everything  # type: ignore[method-assign]
    else:
        raise ValueError(f"unknown sabotage {kind!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.acceptance.runner")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("saga", "worker"):
        p = sub.add_parser(name)
        add_child_arguments(p, lease=1.0, max_attempts=20)
        p.add_argument("--retry", type=int, default=3)
        p.add_argument("--group-commit", action="store_true")
        p.add_argument("--storage-url", help="the URL sagakit's storage connects to (default "
                       "--url, which the events always use): a proxy's, in partition mode")
    sub.choices["saga"].add_argument("--plan", required=True)
    sub.choices["saga"].add_argument("--ids", required=True)
    sub.choices["saga"].add_argument("--stagger", type=float, default=0.2)
    sub.choices["worker"].add_argument("--concurrency", type=int, default=4)
    sub.choices["worker"].add_argument("--poll", type=float, default=0.1)
    args = parser.parse_args(argv)
    if args.command == "saga":
        args.plan_data = json.loads(Path(args.plan).read_text())
    start_child(args, "SAGAKIT_HARNESS_SABOTAGE", _sabotage)
    runner = run_sagas if args.command == "saga" else run_worker
    return asyncio.run(runner(args))


if __name__ == "__main__":
    sys.exit(main())
