"""The ``sagakit`` command's arguments: :func:`build_parser`.

Each subcommand's parser sets ``run`` (``args -> exit code``). Numbers and names are checked
while parsing, as the library checks the same settings: a refused value is a usage error
(exit 2) naming its flag, before anything runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any
from uuid import UUID

from sagakit import settings
from sagakit.cli import inspection, queues, recovery, submission
from sagakit.cli.database import URL_ENV, with_storage
from sagakit.cli.exits import CliError
from sagakit.queue import DEFAULT_QUEUE, MAX_PRIORITY, check_key, check_queue_name
from sagakit.records import SagaStatus

__all__ = ["PROG", "build_parser"]

PROG = "sagakit"


def _status_arg(text: str) -> SagaStatus:
    try:
        return SagaStatus(text.upper())
    except ValueError:
        choices = ", ".join(s.value for s in SagaStatus)
        raise argparse.ArgumentTypeError(f"unknown status {text!r} (choose from {choices})"
                                         ) from None


def _uuid_arg(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad saga id {text!r}: expected a UUID such as "
                                         "3f2a9c1e-0b7d-4c55-9a39-5f7f4c8d2e10") from None


class _Checked(argparse.Action):
    """Stores a numeric option once ``check(flag, value)`` (a :mod:`sagakit.settings` check)
    accepts it; a refused value (NaN, infinite, out of range) is a usage error naming the
    flag."""

    def __init__(self, *args: Any, check: Callable[[str, Any], Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.check = check

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        try:
            value = self.check(option_string or self.dest, values)
        except ValueError as exc:
            parser.error(str(exc))
        self.store(namespace, value)

    def store(self, namespace: argparse.Namespace, value: Any) -> None:
        setattr(namespace, self.dest, value)


class _CheckedAppend(_Checked):
    """A repeatable :class:`_Checked` option: the values in a list."""

    def store(self, namespace: argparse.Namespace, value: Any) -> None:
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), value])


def _lease_seconds(flag: str, value: float) -> float:
    return settings.lease_seconds(value, flag)


def _max_attempts(flag: str, value: int) -> int:
    return settings.recovery_attempts(value, flag)


def _positive_seconds(flag: str, value: float) -> float:
    return settings.seconds(flag, value, exclusive=True)


def _queue(flag: str, value: str) -> str:
    return check_queue_name(value, flag if flag.startswith("-") else "queue name")


def _key(flag: str, value: str) -> str:
    try:
        check_key(value)
    except ValueError:
        raise ValueError(f"{flag} must be 1 to 255 characters without NUL, got {value!r:.60}"
                         ) from None
    return value


def _priority(flag: str, value: int) -> int:
    return settings.count(flag, value, minimum=-MAX_PRIORITY, maximum=MAX_PRIORITY)


def _limit(flag: str, value: int) -> int:
    return settings.count(flag, value, maximum=2**31 - 1)


def _rate(flag: str, value: float) -> float:
    return settings.number(flag, value, minimum=0.0, exclusive=True, maximum=1e6)


def _burst(flag: str, value: float) -> float:
    return settings.number(flag, value, minimum=1.0, maximum=1e9)


def _common(suppress: bool) -> argparse.ArgumentParser:
    """--url and friends, accepted before and after the subcommand."""
    parser = argparse.ArgumentParser(add_help=False)
    default: Any = argparse.SUPPRESS

    def value(normal: Any) -> Any:
        return default if suppress else normal

    group = parser.add_argument_group("database")
    group.add_argument("--url", default=value(None), metavar="URL",
                       help=f"SQLAlchemy async database URL (default: ${URL_ENV}), "
                            "e.g. sqlite+aiosqlite:///sagas.db")
    group.add_argument("--executions-table", default=value("saga_executions"), metavar="NAME",
                       help="saga table name (default: saga_executions)")
    group.add_argument("--logs-table", default=value("saga_logs"), metavar="NAME",
                       help="step log table name (default: saga_logs)")
    group.add_argument("--queues-table", default=value("saga_queues"), metavar="NAME",
                       help="queue limits table name (default: saga_queues)")
    parser.add_argument("-v", "--verbose", action="store_true", default=value(False),
                        help="log more (and show tracebacks of unexpected errors)")
    return parser


def _definition_options(parser: argparse.ArgumentParser, *, required_hint: str) -> None:
    parser.add_argument("--saga", action="append", default=[], metavar="MODULE:CLASS",
                        help=f"a saga definition, e.g. myapp.sagas:OrderSaga (repeatable); "
                             f"{required_hint}")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE",
                        help="import MODULE and use the saga classes in it (repeatable)")


def _recovery_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-attempts", type=int, action=_Checked, check=_max_attempts,
                        default=5, metavar="N",
                        help="recovery attempts before a saga is parked (default: 5)")
    _lease_option(parser, "lease taken on a saga while it runs (default: 30)")


def _lease_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--lease-seconds", type=float, action=_Checked, check=_lease_seconds,
                        default=30.0, metavar="S", help=f"{text}; at least 0.1")


def _run_on_storage(command: Any) -> Callable[[argparse.Namespace], int]:
    return lambda args: with_storage(args, command)


def _inspection_commands(commands: Any, common: list[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("list", parents=common, help="list stored sagas, newest first")
    p.add_argument("--status", action="append", type=_status_arg, default=[], metavar="STATUS",
                   help="only sagas with this status (repeatable)")
    p.add_argument("--name", metavar="NAME", help="only sagas with this saga name")
    p.add_argument("--limit", type=int, action=_Checked, check=settings.count, default=50,
                   metavar="N",
                   help="at most N (default: 50)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(run=_run_on_storage(inspection.list_sagas))

    p = commands.add_parser("show", parents=common,
                            help="one saga: status, context and step history")
    p.add_argument("saga_id", metavar="SAGA_ID")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(run=_run_on_storage(inspection.show))

    p = commands.add_parser(
        "diagram", parents=common, help="print a Mermaid diagram",
        description="diagram module:SagaClass prints the definition's flowchart (--sequence: "
                    "its sequence diagram); diagram SAGA_ID prints the stored saga's flowchart, "
                    "coloured by its step log.",
    )
    p.add_argument("target", metavar="MODULE:CLASS|SAGA_ID")
    p.add_argument("--sequence", action="store_true",
                   help="a sequence diagram instead of a flowchart (definitions only)")
    _definition_options(p, required_hint="for SAGA_ID (else found by name in --import modules)")
    p.set_defaults(run=inspection.diagram)


def _recovery_commands(commands: Any, common: list[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("recover", parents=common,
                            help="recover one interrupted saga, or all of them")
    p.add_argument("saga_id", nargs="?", metavar="SAGA_ID")
    p.add_argument("--all", action="store_true",
                   help="recover every saga due for recovery, until none is left")
    _definition_options(p, required_hint="required with --all")
    _recovery_options(p)
    p.add_argument("--concurrency", type=int, action=_Checked, check=settings.count,
                   default=4, metavar="N", help="sagas recovered at once with --all (default: 4)")
    p.add_argument("--stale-after", type=float, action=_Checked, check=settings.seconds,
                   default=None, metavar="S",
                   help="with --all, only sagas not updated for S seconds")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(run=recovery.recover)

    p = commands.add_parser("worker", parents=common,
                            help="run a worker (submitted sagas and recovery) until SIGTERM")
    _definition_options(p, required_hint="at least one (or --import)")
    _recovery_options(p)
    p.add_argument("--queue", dest="queues", type=str, action=_CheckedAppend, check=_queue,
                   default=None, metavar="QUEUE",
                   help=f"serve the sagas submitted to this queue (repeatable; default: "
                        f"{DEFAULT_QUEUE})")
    p.add_argument("--concurrency", type=int, action=_Checked, check=settings.count,
                   default=4, metavar="N", help="sagas run at once (default: 4)")
    p.add_argument("--poll-interval", type=float, action=_Checked, check=_positive_seconds,
                   default=1.0, metavar="S",
                   help="seconds between polls that found nothing (default: 1)")
    p.add_argument("--max-idle-poll", type=float, action=_Checked, check=_positive_seconds,
                   default=None, metavar="S",
                   help="while idle, the wait between polls grows up to S seconds "
                        "(default: 5 x --poll-interval)")
    p.add_argument("--no-liveness", dest="liveness", action="store_false",
                   help="hold no liveness session: a dead worker's sagas wait for their "
                        "leases (for poolers that drop session locks)")
    p.add_argument("--failover-poll", type=float, action=_Checked, check=_positive_seconds,
                   default=2.0, metavar="S",
                   help="with liveness, look for dead workers' sagas every S seconds (one "
                        "query) and take them over (default: 2)")
    p.add_argument("--stale-after", type=float, action=_Checked, check=settings.seconds,
                   default=None, metavar="S", help="only sagas not updated for S seconds")
    p.add_argument("--shutdown-timeout", type=float, action=_Checked, check=settings.seconds,
                   default=30.0, metavar="S",
                   help="on SIGTERM, wait this long for sagas in hand (default: 30)")
    p.set_defaults(run=_run_on_storage(recovery.worker))

    p = commands.add_parser("resume", parents=common, help="resume a PARKED saga")
    p.add_argument("saga_id", metavar="SAGA_ID")
    _definition_options(p, required_hint="or --import")
    _lease_option(p, "lease taken on the saga while it runs (default: 30)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(run=_run_on_storage(recovery.explicit("resume")))

    p = commands.add_parser("abort", parents=common,
                            help="compensate a saga now (e.g. a PARKED one)")
    p.add_argument("saga_id", metavar="SAGA_ID")
    _definition_options(p, required_hint="or --import")
    p.add_argument("--reason", default="aborted by operator", metavar="TEXT",
                   help="recorded in the step log (default: 'aborted by operator')")
    _lease_option(p, "lease taken on the saga while it runs (default: 30)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(run=_run_on_storage(recovery.explicit("abort")))


def _submit(args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.wait:
        raise CliError("--timeout needs --wait")
    return with_storage(args, submission.submit)


def _queue_commands(commands: Any, common: list[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "submit", parents=common, help="hand a saga to workers; print its id",
        description="Store a saga PENDING in a queue for workers (sagakit worker --queue) to "
                    "run, and print its id. --wait follows it to its end.")
    p.add_argument("--saga", metavar="MODULE:CLASS",
                   help="the saga definition, e.g. myapp.sagas:OrderSaga (required)")
    p.add_argument("--context", required=True, metavar="JSON",
                   help="the saga's context, a JSON object")
    p.add_argument("--queue", type=str, action=_Checked, check=_queue, default=DEFAULT_QUEUE,
                   metavar="QUEUE", help=f"the queue (default: {DEFAULT_QUEUE})")
    p.add_argument("--key", type=str, action=_Checked, check=_key, default=None, metavar="KEY",
                   help="concurrency key (e.g. a customer id; see queues set --key-concurrency)")
    p.add_argument("--priority", type=int, action=_Checked, check=_priority, default=0,
                   metavar="N", help="higher is claimed first within the queue (default: 0)")
    p.add_argument("--id", type=_uuid_arg, default=None, metavar="UUID",
                   help="the saga's id (default: a new one); an id already submitted for this "
                        "saga writes nothing")
    p.add_argument("--wait", action="store_true",
                   help="wait until the saga is COMPLETED, FAILED or PARKED")
    p.add_argument("--timeout", type=float, action=_Checked, check=_positive_seconds,
                   default=None, metavar="S", help="with --wait, give up after S seconds")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(run=_submit)

    p = commands.add_parser(
        "queues", parents=common, help="list queues (limits, sagas per status); set, delete",
        description="queues lists every configured queue and every queue holding sagas: its "
                    "limits and how many sagas it holds per status. queues set NAME replaces "
                    "a queue's limits; queues delete NAME removes them.")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(run=_run_on_storage(queues.list_queues))
    actions = p.add_subparsers(dest="queues_action", metavar="ACTION")

    s = actions.add_parser("set", parents=common,
                           help="create or replace a queue's limits (not given: no limit)")
    s.add_argument("name", type=str, action=_Checked, check=_queue, metavar="NAME")
    s.add_argument("--concurrency", type=int, action=_Checked, check=_limit, default=None,
                   metavar="N", help="at most N of its sagas run at once, across all workers")
    s.add_argument("--key-concurrency", type=int, action=_Checked, check=_limit, default=None,
                   metavar="N", help="at most N run at once per concurrency key")
    s.add_argument("--rate", type=float, action=_Checked, check=_rate, default=None,
                   metavar="R", help="at most R starts per second (> 0)")
    s.add_argument("--burst", type=float, action=_Checked, check=_burst, default=None,
                   metavar="B", help="with --rate, up to B starts at once (default: max(1, R))")
    s.add_argument("--json", action="store_true", help="JSON output")
    s.set_defaults(run=_set_queue)

    s = actions.add_parser("delete", parents=common,
                           help="remove a queue's limits (its sagas stay, unlimited)")
    s.add_argument("name", type=str, action=_Checked, check=_queue, metavar="NAME")
    s.set_defaults(run=_run_on_storage(queues.delete_queue))


def _set_queue(args: argparse.Namespace) -> int:
    queues.check_limits(args)
    return with_storage(args, queues.set_queue)


def _demo(args: argparse.Namespace) -> int:
    from sagakit.demo import main as demo_main

    return demo_main([*(["--db", str(args.db)] if args.db else []),
                      *(["--discard"] if args.discard else [])])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sagakit`` command."""
    from sagakit import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, parents=[_common(False)],
        description="Inspect, draw, recover and operate sagakit sagas stored in a database.",
        epilog="exit codes: 0 ok, 1 a saga is not terminal or an attempt failed, 2 usage, "
               "3 unknown saga id or queue, 4 database unreachable or failing, 5 saga busy, "
               "130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"sagakit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = [_common(True)]
    _inspection_commands(commands, common)
    _recovery_commands(commands, common)
    _queue_commands(commands, common)

    p = commands.add_parser("demo", help="run the crash-and-recovery demo on SQLite, keep the "
                                         "database and say what to try on it")
    p.add_argument("--db", metavar="PATH",
                   help="the SQLite file (default: sagas.db in a new temporary directory)")
    p.add_argument("--discard", action="store_true",
                   help="delete the database at the end instead of keeping it")
    p.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.set_defaults(run=_demo)
    return parser
