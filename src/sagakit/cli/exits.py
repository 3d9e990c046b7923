"""Exit codes of the ``sagakit`` command, and the one-line errors that carry them.

Every failure a command expects is a :class:`CliError`: one line on stderr and an exit code.
Database failures (sagakit's storage errors, SQLAlchemy's, the driver's) are turned into one by
:func:`database_error`.
"""

from __future__ import annotations

from typing import Any

from sagakit.exceptions import SagaStorageError, SagaStorageUnavailableError

__all__ = [
    "EXIT_BUSY",
    "EXIT_DATABASE",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNFINISHED",
    "EXIT_USAGE",
    "CliError",
    "Terminated",
    "database_error",
    "one_line",
    "terminate_early",
]

EXIT_OK = 0
EXIT_UNFINISHED = 1
"""The command ran, but a saga it touched is not terminal, or a recovery attempt failed."""
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
"""No saga with that id (or no queue with that name)."""
EXIT_DATABASE = 4
EXIT_BUSY = 5
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure reported as one line on stderr with an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Terminated(BaseException):
    """SIGTERM arrived before the worker was ready to shut down gracefully."""


def terminate_early(signum: int, frame: Any) -> None:
    """The SIGTERM handler while a worker starts up or closes: end the command, exit 0."""
    raise Terminated


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 500 characters."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return first[:500]


def database_error(exc: BaseException) -> CliError | None:
    """The CliError for a database failure (exit 4), or None when ``exc`` is not one."""
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, SagaStorageError):
        cause = exc.__cause__
        inner = cause.orig if isinstance(cause, sa_exc.DBAPIError) and cause.orig else cause
        text = f"{type(inner).__name__}: {one_line(inner)}" if inner else one_line(exc)
        if isinstance(exc, SagaStorageUnavailableError):
            return CliError(f"cannot reach the database: {text}", EXIT_DATABASE)
        return CliError(f"database error: {text} (is the schema created, and are "
                        "--executions-table/--logs-table right?)", EXIT_DATABASE)
    if isinstance(exc, sa_exc.DBAPIError):
        original = exc.orig if exc.orig is not None else exc
        text = one_line(original) or type(original).__name__
        if exc.connection_invalidated or _looks_unreachable(original):
            return CliError(f"cannot reach the database: {text}", EXIT_DATABASE)
        return CliError(f"database error: {text} (is the schema created, and are "
                        "--executions-table/--logs-table right?)", EXIT_DATABASE)
    if isinstance(exc, sa_exc.SQLAlchemyError):
        return CliError(f"database error: {one_line(exc)}", EXIT_DATABASE)
    if isinstance(exc, OSError | TimeoutError):
        return CliError(f"cannot reach the database: {type(exc).__name__}: {one_line(exc)}",
                        EXIT_DATABASE)
    return None


def _looks_unreachable(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError | TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
