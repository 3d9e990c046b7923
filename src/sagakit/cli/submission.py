"""The ``submit`` command: hand a saga to workers, and with ``--wait`` follow it to its end."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from sagakit.cli.definitions import decode_context, load_saga
from sagakit.cli.exits import EXIT_OK, EXIT_UNFINISHED, CliError, one_line
from sagakit.cli.render import Outcome, print_json, report
from sagakit.exceptions import SagaDefinitionError

if TYPE_CHECKING:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

__all__ = ["submit"]


async def submit(args: argparse.Namespace, storage: SqlAlchemySagaStorage) -> int:
    """Store the saga PENDING in its queue and print its id. With ``--wait``, then wait until
    it is COMPLETED, FAILED or PARKED and print that as ``recover`` does (exit 0 for COMPLETED
    or FAILED, 1 for PARKED or after ``--timeout``). A ``--id`` already stored for another saga
    is a usage error; one stored for this saga submits nothing and follows it."""
    if not args.saga:
        raise CliError("no saga definition given: pass --saga module:SagaClass")
    saga = load_saga(args.saga)
    context = decode_context(saga, args.context)
    try:
        handle = await saga().submit(context, storage=storage, queue=args.queue,
                                     concurrency_key=args.key, priority=args.priority,
                                     saga_id=args.id)
    except SagaDefinitionError as exc:  # --id of another saga
        raise CliError(f"bad --id: {one_line(exc)}") from None
    if not handle.created:
        print(f"saga {handle.saga_id} was already submitted: nothing written, following it",
              file=sys.stderr)
    facts = {"saga_id": str(handle.saga_id), "name": handle.saga_name, "queue": handle.queue,
             "created": handle.created}
    if not args.wait:
        if args.json:
            print_json(facts)
        else:
            print(handle.saga_id)
        return EXIT_OK
    if not args.json:
        print(handle.saga_id, flush=True)
    try:
        async with asyncio.timeout(args.timeout):
            state = await handle.outcome()
    except TimeoutError:
        now = await handle.state()
        raise CliError(f"saga {handle.saga_id} is still {now.status.value} after "
                       f"{args.timeout:g} s (it goes on; sagakit show follows it)",
                       EXIT_UNFINISHED) from None
    outcome = Outcome(handle.saga_id, handle.saga_name, state.status)
    if args.json:
        print_json({**facts, "status": state.status.value})
        return EXIT_OK if outcome.ok() else EXIT_UNFINISHED
    return report(args, [outcome], many=False)
