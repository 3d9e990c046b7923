"""The commands that read sagas: ``list``, ``show`` and ``diagram``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING
from uuid import UUID

from sagakit.cli import render
from sagakit.cli.database import with_storage
from sagakit.cli.definitions import definition_for, load_saga
from sagakit.cli.exits import EXIT_OK, CliError
from sagakit.records import TERMINAL_STATUSES, SagaState, SagaStatus

if TYPE_CHECKING:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

__all__ = ["diagram", "list_sagas", "parse_saga_id", "show"]

_NOT_SCHEDULED = TERMINAL_STATUSES | {SagaStatus.PARKED}


def parse_saga_id(text: str) -> UUID:
    """A saga id given on the command line; a usage error when it is not a UUID."""
    try:
        return UUID(text)
    except ValueError:
        raise CliError(f"bad saga id {text!r}: expected a UUID such as "
                       "3f2a9c1e-0b7d-4c55-9a39-5f7f4c8d2e10") from None


def _queue_columns(states: Sequence[SagaState]) -> tuple[list[str], list[list[str]]]:
    """The QUEUE column when a listed saga was submitted, KEY and PRIORITY when one has them;
    cells ``-`` for sagas without."""
    headers: list[str] = []
    cells: list[list[str]] = [[] for _ in states]
    if any(s.queue is not None for s in states):
        headers.append("QUEUE")
        for row, s in zip(cells, states, strict=True):
            row.append(s.queue or "-")
    if any(s.concurrency_key is not None for s in states):
        headers.append("KEY")
        for row, s in zip(cells, states, strict=True):
            row.append(s.concurrency_key or "-")
    if any(s.priority for s in states):
        headers.append("PRIORITY")
        for row, s in zip(cells, states, strict=True):
            row.append(str(s.priority) if s.queue is not None else "-")
    return headers, cells


async def list_sagas(args: argparse.Namespace, storage: SqlAlchemySagaStorage) -> int:
    statuses = frozenset(args.status) if args.status else None
    states = await storage.list_sagas(statuses=statuses, saga_name=args.name,
                                      limit=args.limit + 1)  # one more: are there more?
    more = len(states) > args.limit
    states = states[:args.limit]
    if args.json:
        render.print_json([render.state_json(s, context=False) for s in states])
        return EXIT_OK
    if not states:
        print("no sagas found")
        return EXIT_OK
    now = dt.datetime.now(dt.UTC)
    queue_headers, queue_cells = _queue_columns(states)
    rows = [(str(s.saga_id), s.name, render.status(s), *queued, str(s.version),
             str(s.recovery_attempts), render.when(s.updated_at), render.lease(s, now))
            for s, queued in zip(states, queue_cells, strict=True)]
    print(render.table(("ID", "NAME", "STATUS", *queue_headers, "VERSION", "ATTEMPTS",
                        "UPDATED (UTC)", "LEASE OWNER"), rows))
    if more:
        print(f"(the {args.limit} newest; there are more: raise --limit, or "
              "narrow with --status or --name)")
    return EXIT_OK


async def show(args: argparse.Namespace, storage: SqlAlchemySagaStorage) -> int:
    saga_id = parse_saga_id(args.saga_id)
    state = await storage.get_saga(saga_id)
    history = await storage.get_step_history(saga_id)
    if args.json:
        data = render.state_json(state, context=True)
        data["history"] = [render.entry_json(e) for e in history]
        render.print_json(data)
        return EXIT_OK
    now = dt.datetime.now(dt.UTC)
    lease = render.lease(state, now)
    if state.lease_owner:
        lease += f" until {render.when(state.lease_expires_at)}"
    fields = [("saga", str(state.saga_id)), ("name", state.name)]
    if state.queue is not None:
        fields.append(("queue", state.queue))
    if state.concurrency_key is not None:
        fields.append(("key", state.concurrency_key))
    if state.priority:
        fields.append(("priority", str(state.priority)))
    fields += [
        ("status", state.status.value),
        ("version", str(state.version)),
        ("attempts", str(state.recovery_attempts)),
        ("created", render.when(state.created_at)),
        ("updated", render.when(state.updated_at)),
        ("lease", lease),
        # Only where recovery will run the saga again: a parked or finished saga may keep the
        # time of a backoff that no longer applies.
        ("next attempt", "-" if state.status in _NOT_SCHEDULED
         else render.when(state.next_attempt_at)),
        ("fingerprint", state.fingerprint or "-"),
    ]
    if state.deadline_at is not None:
        fields.append(("deadline", render.when(state.deadline_at)))
    if state.past_pivot:
        fields.append(("past pivot", "yes"))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {value}")
    print("context:")
    text = json.dumps(state.context, indent=2, ensure_ascii=False, default=str)
    print("\n".join("  " + line for line in text.splitlines()))
    if not history:
        print("steps: none recorded")
        return EXIT_OK
    print("steps:")
    attempts = any(entry.attempt is not None for entry in history)  # else no ATTEMPT column
    rows = []
    for number, entry in enumerate(history, start=1):
        error = render.clip(entry.details) or entry.error_type or ""
        attempt = [] if not attempts else [str(entry.attempt or "")]
        rows.append((str(number), render.when(entry.timestamp), entry.step_name,
                     str(entry.action), str(entry.status), *attempt, error))
    headers = ("#", "TIME (UTC)", "STEP", "ACTION", "STATUS", *(["ATTEMPT"] * attempts), "ERROR")
    lines = render.table(headers, rows)
    print("\n".join("  " + line for line in lines.splitlines()))
    return EXIT_OK


def diagram(args: argparse.Namespace) -> int:
    from sagakit import diagram

    if ":" in args.target:
        if args.saga or args.imports:
            raise CliError("diagram module:SagaClass draws that definition: "
                           "--saga and --import are for a saga id")
        saga = load_saga(args.target)
        print(diagram.sequence(saga) if args.sequence else diagram.flowchart(saga), end="")
        return EXIT_OK
    try:
        saga_id = UUID(args.target)
    except ValueError:
        raise CliError(f"bad diagram target {args.target!r}: expected module:SagaClass "
                       "(a definition) or a saga id") from None
    if args.sequence:
        raise CliError("--sequence draws a definition: use diagram module:SagaClass --sequence")

    async def instance(args: argparse.Namespace, storage: SqlAlchemySagaStorage) -> int:
        state = await storage.get_saga(saga_id)
        history = await storage.get_step_history(saga_id)
        saga = definition_for(args, state)
        print(diagram.instance_flowchart(saga, state, history), end="")
        return EXIT_OK

    return with_storage(args, instance)
