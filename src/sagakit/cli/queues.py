"""The ``queues`` command: list the queues of submitted sagas with their limits and how many
sagas each holds per status; ``queues set`` and ``queues delete`` change their limits."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from sagakit.cli.exits import EXIT_NOT_FOUND, EXIT_OK, CliError
from sagakit.cli.render import print_json, table
from sagakit.queue import QueueSettings
from sagakit.records import SagaStatus

if TYPE_CHECKING:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

__all__ = ["COLUMNS", "delete_queue", "list_queues", "set_queue"]

COLUMNS = (SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.WAITING, SagaStatus.COMPENSATING,
           SagaStatus.PARKED, SagaStatus.COMPLETED, SagaStatus.FAILED)
"""The statuses counted per queue, in the order of the table's columns."""


def _number(value: float | int | None) -> str:
    return "-" if value is None else f"{value:g}"


def _limits_json(limits: QueueSettings | None) -> dict[str, Any]:
    return {"concurrency": limits.concurrency if limits else None,
            "key_concurrency": limits.key_concurrency if limits else None,
            "rate": limits.rate if limits else None,
            "burst": limits.bucket if limits else None}


def describe(limits: QueueSettings) -> str:
    """One line: a queue's limits, in words (``no limits`` for none)."""
    parts = []
    if limits.concurrency is not None:
        parts.append(f"concurrency {limits.concurrency}")
    if limits.key_concurrency is not None:
        parts.append(f"key concurrency {limits.key_concurrency}")
    if limits.rate is not None:
        parts.append(f"rate {limits.rate:g}/s, burst {_number(limits.bucket)}")
    return f"queue {limits.name}: " + (", ".join(parts) or "no limits")


async def list_queues(args: argparse.Namespace, storage: SqlAlchemySagaStorage) -> int:
    """Every configured queue and every queue holding sagas, by name: its limits (``-``: none)
    and its sagas per status."""
    configured = {q.name: q for q in await storage.get_queues()}
    counts = await storage.queue_counts()
    names = sorted(configured.keys() | counts.keys())
    if args.json:
        print_json([{"name": name, "configured": name in configured,
                     **_limits_json(configured.get(name)),
                     "counts": {s.value: n for s, n in counts.get(name, {}).items() if n}}
                    for name in names])
        return EXIT_OK
    if not names:
        print("no queues: none configured, no saga submitted")
        return EXIT_OK
    rows = []
    for name in names:
        limits = configured.get(name)
        held = counts.get(name, {})
        rows.append((name, _number(limits.concurrency if limits else None),
                     _number(limits.key_concurrency if limits else None),
                     _number(limits.rate if limits else None),
                     _number(limits.bucket if limits else None),
                     *(str(held.get(status, 0)) for status in COLUMNS)))
    print(table(("QUEUE", "CONCURRENCY", "PER-KEY", "RATE", "BURST",
                 *(status.value for status in COLUMNS)), rows))
    return EXIT_OK


async def set_queue(args: argparse.Namespace, storage: SqlAlchemySagaStorage) -> int:
    """Create or replace a queue's limits: an option not given is no such limit."""
    limits = QueueSettings(args.name, concurrency=args.concurrency,
                           key_concurrency=args.key_concurrency, rate=args.rate,
                           burst=args.burst)
    await storage.set_queue(limits)
    if args.json:
        print_json({"name": limits.name, **_limits_json(limits)})
    else:
        print(describe(limits))
    return EXIT_OK


async def delete_queue(args: argparse.Namespace, storage: SqlAlchemySagaStorage) -> int:
    """Forget a queue's limits (its sagas stay, now unlimited); exit 3 when it had none."""
    if not await storage.delete_queue(args.name):
        raise CliError(f"no queue {args.name!r} is configured", EXIT_NOT_FOUND)
    print(f"queue {args.name}: limits deleted (its sagas stay; it is now unlimited)")
    return EXIT_OK


def check_limits(args: argparse.Namespace) -> None:
    """The checks ``queues set`` makes across options, before the database is opened."""
    if args.burst is not None and args.rate is None:
        raise CliError("--burst needs --rate (the burst is the rate limit's bucket)")
