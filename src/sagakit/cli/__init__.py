"""The ``sagakit`` command: inspect, draw, recover, submit and operate stored sagas.

``sagakit --url sqlite+aiosqlite:///sagas.db list`` (or ``SAGAKIT_DATABASE_URL``). Subcommands:
``list``, ``show``, ``diagram``, ``recover``, ``worker``, ``resume``, ``abort``, ``submit``,
``queues`` and ``demo``; see ``docs/cli.md`` or ``sagakit COMMAND --help``.

Exit codes: 0 success; 1 the command ran but a saga it touched is not terminal (or a recovery
attempt failed); 2 usage (bad arguments, URL, ``module:Class`` or saga definition); 3 no saga
with that id (or no queue with that name); 4 the database cannot be reached or answered with an
error; 5 the saga is leased by a live run; 130 interrupted.

The modules: :mod:`~sagakit.cli.parser` (the arguments), :mod:`~sagakit.cli.inspection`
(``list``, ``show``, ``diagram``), :mod:`~sagakit.cli.recovery` (``recover``, ``resume``,
``abort``, ``worker``), :mod:`~sagakit.cli.submission` (``submit``), :mod:`~sagakit.cli.queues`
(``queues``), with :mod:`~sagakit.cli.definitions` (``module:Class``, ``--context``),
:mod:`~sagakit.cli.database`, :mod:`~sagakit.cli.render` and :mod:`~sagakit.cli.exits`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from sagakit.cli.definitions import load_saga
from sagakit.cli.exits import (
    EXIT_BUSY,
    EXIT_DATABASE,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNFINISHED,
    EXIT_USAGE,
    CliError,
    Terminated,
    one_line,
    terminate_early,
)
from sagakit.cli.parser import PROG, build_parser

__all__ = [
    "EXIT_BUSY",
    "EXIT_DATABASE",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNFINISHED",
    "EXIT_USAGE",
    "CliError",
    "build_parser",
    "load_saga",
    "main",
]

logger = logging.getLogger("sagakit.cli")


def _configure_logging(args: argparse.Namespace) -> None:
    if args.command == "worker":
        level = logging.DEBUG if args.verbose else logging.INFO
    else:
        level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sagakit`` command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    if args.command == "worker" and threading.current_thread() is threading.main_thread():
        # Until the worker installs its graceful handler, SIGTERM (a deploy that changed its
        # mind, a supervisor stopping a worker still starting) ends the command cleanly, rc 0:
        # nothing is in hand yet.
        signal.signal(signal.SIGTERM, terminate_early)
    try:
        code: int = args.run(args)
    except Terminated:
        logger.info("worker stopped during start-up (SIGTERM)")
        return EXIT_OK
    except CliError as exc:
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `sagakit list | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        if args.verbose:
            raise
        print(f"{PROG}: error: unexpected {type(exc).__name__}: {one_line(exc)} "
              "(run with -v for the traceback)", file=sys.stderr)
        return EXIT_UNFINISHED
    return code
