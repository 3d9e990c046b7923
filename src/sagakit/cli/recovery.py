"""The commands that run sagas' steps: ``recover``, ``resume``, ``abort`` and ``worker``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections import Counter
from typing import TYPE_CHECKING
from uuid import UUID

from sagakit.cli.database import Command, with_storage
from sagakit.cli.definitions import definition_for, require_definitions
from sagakit.cli.exits import EXIT_OK, EXIT_UNFINISHED, CliError, one_line, terminate_early
from sagakit.cli.inspection import parse_saga_id
from sagakit.cli.render import Outcome, report
from sagakit.queue import DEFAULT_QUEUE
from sagakit.records import TERMINAL_STATUSES

if TYPE_CHECKING:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
    from sagakit.worker import RecoveryOutcome

__all__ = ["explicit", "recover", "worker"]

logger = logging.getLogger("sagakit.cli")


def explicit(action: str) -> Command:
    """recover / resume / abort of one saga by id."""

    async def command(args: argparse.Namespace, storage: SqlAlchemySagaStorage) -> int:
        from sagakit.recovery import abort_saga, recover_saga, resume_saga

        saga_id = parse_saga_id(args.saga_id)
        state = await storage.get_saga(saga_id)
        if action == "abort" and state.status in TERMINAL_STATUSES:
            raise CliError(f"saga {saga_id} ({state.name}) is already {state.status.value}: "
                           "there is nothing left to abort; nothing written")
        saga = definition_for(args, state)
        if action == "recover":
            status = await recover_saga(saga, saga_id, storage=storage,
                                        max_recovery_attempts=args.max_attempts,
                                        lease_seconds=args.lease_seconds)
        elif action == "resume":
            status = await resume_saga(saga, saga_id, storage=storage,
                                       lease_seconds=args.lease_seconds)
        else:
            status = await abort_saga(saga, saga_id, storage=storage, reason=args.reason,
                                      lease_seconds=args.lease_seconds)
        return report(args, [Outcome(saga_id, state.name, status, before=state.status)],
                      many=False)

    return command


async def _recover_all(args: argparse.Namespace, storage: SqlAlchemySagaStorage) -> int:
    from sagakit.recovery import RecoveryOptions
    from sagakit.worker import RecoveryWorker

    sagas = require_definitions(args)
    options = RecoveryOptions(max_recovery_attempts=args.max_attempts,
                              lease_seconds=args.lease_seconds)
    workers = [
        RecoveryWorker(storage, [saga], concurrency=args.concurrency, saga_name=saga.name,
                       stale_after_seconds=args.stale_after, options=options)
        for saga in sagas
    ]
    seen: dict[UUID, Outcome] = {}
    progress = True
    while progress:  # until a round of polls finds no saga not handled yet
        progress = False
        for saga, worker in zip(sagas, workers, strict=True):
            for outcome in await worker.run_once():
                if outcome.saga_id in seen and not seen[outcome.saga_id].busy:
                    continue
                progress = progress or outcome.saga_id not in seen
                seen[outcome.saga_id] = _outcome(saga.name, outcome)
                if not args.json:  # the progress: each saga as its attempt ends
                    print(seen[outcome.saga_id].line(), flush=True)
    outcomes = list(seen.values())
    if args.json:
        return report(args, outcomes, many=True)
    print(summary(outcomes))
    return EXIT_OK if all(o.ok() for o in outcomes) else EXIT_UNFINISHED


def summary(outcomes: list[Outcome]) -> str:
    """One line: how many sagas, and how they ended."""
    if not outcomes:
        return "nothing to recover"
    counts = Counter("error" if o.error is not None else "busy" if o.busy
                     else o.status.value if o.status else "?" for o in outcomes)
    parts = ", ".join(f"{n} {what}" for what, n in sorted(counts.items(),
                                                           key=lambda kv: (-kv[1], kv[0])))
    return f"recovered {len(outcomes)} saga{'s' if len(outcomes) != 1 else ''}: {parts}"


def _outcome(name: str, outcome: RecoveryOutcome) -> Outcome:
    error = None
    if outcome.error is not None and not outcome.busy:
        error = f"{type(outcome.error).__name__}: {one_line(outcome.error)}"
    return Outcome(outcome.saga_id, name, outcome.status, error=error, busy=outcome.busy)


def recover(args: argparse.Namespace) -> int:
    if args.all == (args.saga_id is not None):
        raise CliError("recover needs a SAGA_ID or --all (not both)")
    if args.all:
        return with_storage(args, _recover_all)
    return with_storage(args, explicit("recover"))


async def worker(args: argparse.Namespace, storage: SqlAlchemySagaStorage) -> int:
    from sagakit.recovery import RecoveryOptions
    from sagakit.worker import RecoveryWorker

    sagas = require_definitions(args)
    queues = list(dict.fromkeys(args.queues or [DEFAULT_QUEUE]))
    if args.max_idle_poll is not None and args.max_idle_poll < args.poll_interval:
        raise CliError(f"--max-idle-poll ({args.max_idle_poll:g}) must be at least "
                       f"--poll-interval ({args.poll_interval:g})")
    await storage.list_sagas(limit=1)  # fail fast (exit 4) when the database is not there
    worker = RecoveryWorker(
        storage, sagas, concurrency=args.concurrency, poll_interval=args.poll_interval,
        stale_after_seconds=args.stale_after, shutdown_timeout=args.shutdown_timeout,
        options=RecoveryOptions(max_recovery_attempts=args.max_attempts,
                                lease_seconds=args.lease_seconds),
        queues=queues, max_idle_poll=args.max_idle_poll, liveness=args.liveness,
        failover_poll=args.failover_poll,
    )
    names = ", ".join(s.name for s in sagas)
    logger.info("worker started (pid %d): sagas %s, queues %s, concurrency %d, polling every "
                "%gs (up to %gs when idle)", os.getpid(), names, ", ".join(queues),
                args.concurrency, args.poll_interval, worker.max_idle_poll)
    await worker.run()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate_early)  # a second SIGTERM while closing: rc 0
    logger.info("worker stopped (sagas run: %d)", len(worker.outcomes))
    return EXIT_OK
