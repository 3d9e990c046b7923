"""The database a command works on: opening ``SqlAlchemySagaStorage`` from ``--url`` (or
``$SAGAKIT_DATABASE_URL``), running a command against it, and turning what goes wrong into
exit codes (see :mod:`sagakit.cli.exits`)."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sagakit.cli.exits import (
    EXIT_BUSY,
    EXIT_DATABASE,
    EXIT_NOT_FOUND,
    EXIT_UNFINISHED,
    CliError,
    database_error,
    one_line,
)
from sagakit.exceptions import (
    SagaBusyError,
    SagaDefinitionError,
    SagaNotFoundError,
    SagaPastPivotError,
)

if TYPE_CHECKING:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

__all__ = ["URL_ENV", "Command", "open_storage", "run_async", "with_storage"]

URL_ENV = "SAGAKIT_DATABASE_URL"

Command = Callable[[argparse.Namespace, "SqlAlchemySagaStorage"], Awaitable[int]]
"""A command that works on the database: ``(args, storage) -> exit code``."""


def open_storage(args: argparse.Namespace) -> SqlAlchemySagaStorage:
    """The storage of ``--url`` and the table options. A usage error for a missing or bad URL
    or table name; exit 4 for a SQLite file that does not exist (it is never created)."""
    import sqlalchemy as sa
    from sqlalchemy import exc as sa_exc

    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    url = args.url or os.environ.get(URL_ENV, "")
    if not url:
        raise CliError(f"no database: pass --url or set {URL_ENV} "
                       "(e.g. sqlite+aiosqlite:///sagas.db)")
    try:
        parsed = sa.engine.make_url(url)
    except sa_exc.ArgumentError:
        raise CliError(f"bad database URL {url!r}: expected dialect+driver://..., "
                       "e.g. sqlite+aiosqlite:///sagas.db") from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        storage = SqlAlchemySagaStorage.from_url(
            url, executions_table=args.executions_table, logs_table=args.logs_table,
            queues_table=args.queues_table,
        )
    except ImportError as exc:
        raise CliError(f"bad database URL {shown}: {one_line(exc)}") from None
    except ValueError as exc:  # a table name that is not an identifier, or too long
        raise CliError(one_line(exc)) from None
    except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, sa_exc.InvalidRequestError) as exc:
        raise CliError(f"bad database URL {shown}: {one_line(exc)}") from None
    if parsed.get_backend_name() == "sqlite":  # don't let SQLite create an empty file
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:") and not (
            Path(database).is_file()
        ):
            raise CliError(f"cannot reach the database {shown}: no such SQLite file "
                           f"{database!r}", EXIT_DATABASE)
    return storage


def with_storage(args: argparse.Namespace, command: Command) -> int:
    """Run ``command`` on the storage of ``args``, closing it after."""
    storage = open_storage(args)

    async def run() -> int:
        try:
            return await command(args, storage)
        finally:
            await storage.close()

    return run_async(run())


def run_async(coro: Awaitable[int]) -> int:
    """Run a command's coroutine; sagakit's and the database's errors become CliErrors: no
    such saga (3), busy (5), a definition that does not fit (1), the database (4)."""
    async def guarded() -> int:
        try:
            return await coro
        except (CliError, BrokenPipeError):  # a closed stdout (`| head`) is no database fault
            raise
        except SagaNotFoundError as exc:
            raise CliError(one_line(exc), EXIT_NOT_FOUND) from None
        except SagaBusyError as exc:
            raise CliError(f"{one_line(exc)} (leased by a live run; try again later)",
                           EXIT_BUSY) from None
        except (SagaDefinitionError, SagaPastPivotError) as exc:
            raise CliError(one_line(exc), EXIT_UNFINISHED) from None
        except Exception as exc:
            error = database_error(exc)
            if error is None:
                raise
            raise error from None

    return asyncio.run(guarded())
