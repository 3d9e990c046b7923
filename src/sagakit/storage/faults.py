"""What a database error means for sagakit, whatever driver raised it.

Every error of the SQL storage's drivers (asyncpg, asyncmy, aiomysql, aiosqlite, and SQLAlchemy
around them) reaches callers as one of sagakit's own errors, with the driver's error as
``__cause__`` (see :func:`storage_error`). What kind of error it becomes is decided here, from the
error itself, in one place:

- **unavailable** (:class:`~sagakit.exceptions.SagaStorageUnavailableError`): no usable
  connection. The server refused or dropped the connection, is shutting down or starting up,
  has no connection slot left, or the pool had no connection free in time. Such a failure of a
  pooled connection is worth one more try on a fresh connection (:func:`reconnectable`).
- **rejected** (:class:`~sagakit.exceptions.SagaStorageRejectedError`): the database refused
  the data (a value too long, out of range, an invalid character, a constraint). The same write
  fails again.
- anything else (:class:`~sagakit.exceptions.SagaStorageError`): a deadlock, a lock timeout, a
  missing table, a bug.

PostgreSQL errors are told by their SQLSTATE, MySQL/MariaDB errors by their error number, and
errors below the database protocol (sockets, timeouts) by their Python type.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import Any
from uuid import UUID

from sqlalchemy import exc as sa_exc

from sagakit.exceptions import (
    SagaError,
    SagaStorageError,
    SagaStorageRejectedError,
    SagaStorageUnavailableError,
)
from sagakit.storage.schema import UPGRADE_HINT

__all__ = [
    "Fault", "PoolExhausted", "classify", "lock_conflict", "reconnectable", "storage_error",
]


class Fault(enum.Enum):
    UNAVAILABLE = "unavailable"
    REJECTED = "rejected"
    OTHER = "other"


class PoolExhausted(TimeoutError):
    """No pooled connection came free within the storage's wait (raised by the storage's own
    connection gate; SQLAlchemy's pool raises ``sqlalchemy.exc.TimeoutError``)."""


# SQLSTATE classes and codes (PostgreSQL): 08 connection exception, 53 insufficient resources
# (too many connections...), 57P01-57P03 admin/crash shutdown and "cannot connect now"; 22 data
# exception, 23 integrity constraint violation, 54 program limit exceeded.
_PG_UNAVAILABLE_CLASSES = ("08", "53")
_PG_UNAVAILABLE = frozenset({"57P01", "57P02", "57P03"})
_PG_REJECTED_CLASSES = ("22", "23", "54")

# MySQL/MariaDB error numbers: client-side connection errors (2002-2055), too many connections,
# server shutdown, packet too large / aborted connection, connection killed, idle disconnect.
_MY_UNAVAILABLE = frozenset({
    1040, 1053, 1152, 1153, 1927, 2002, 2003, 2005, 2006, 2011, 2012, 2013, 2026, 2055, 4031,
})
# Data too long, out of range, incorrect value/string/datetime, null in a NOT NULL column,
# duplicate key, foreign key, check constraint, invalid JSON.
_MY_REJECTED = frozenset({
    1048, 1062, 1264, 1265, 1292, 1366, 1406, 1451, 1452, 1690, 3140, 3819, 4025,
})

# Driver errors that mean "this connection is gone or unusable", told by class name so the
# optional drivers need not be imported: asyncpg's InterfaceError ("connection is closed"),
# ConnectionDoesNotExistError and InternalClientError (its protocol confused by a connection the
# server terminated), asyncmy/aiomysql's InterfaceError (0, "Not connected").
_GONE = frozenset({
    "ConnectionDoesNotExistError", "ConnectionFailureError", "InterfaceError",
    "InternalClientError",
})
_SQLITE_UNAVAILABLE = ("unable to open database", "disk i/o error")


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error, the driver error SQLAlchemy wraps, and their causes (each once)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend((getattr(current, "orig", None), current.__cause__, current.__context__))


def classify(error: BaseException) -> Fault:
    """The kind of a database error (see the module docstring)."""
    if isinstance(error, sa_exc.TimeoutError | PoolExhausted):
        return Fault.UNAVAILABLE
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return Fault.UNAVAILABLE
    for current in _chain(error):
        code = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(code, str) and len(code) == 5:
            if code in _PG_UNAVAILABLE or code.startswith(_PG_UNAVAILABLE_CLASSES):
                return Fault.UNAVAILABLE
            if code.startswith(_PG_REJECTED_CLASSES):
                return Fault.REJECTED
            return Fault.OTHER
        number = _mysql_number(current)
        if number is not None:
            if number in _MY_UNAVAILABLE or (number == 0 and _named(current, _GONE)):
                return Fault.UNAVAILABLE
            if number in _MY_REJECTED:
                return Fault.REJECTED
            if number:
                return Fault.OTHER
        if isinstance(current, OSError | TimeoutError | ConnectionError):
            return Fault.UNAVAILABLE
        if _named(current, _GONE):
            return Fault.UNAVAILABLE
        if _is_sqlite(current):
            text = str(current).lower()
            if any(part in text for part in _SQLITE_UNAVAILABLE):
                return Fault.UNAVAILABLE
            if type(current).__name__ in ("IntegrityError", "DataError"):
                return Fault.REJECTED
    return Fault.OTHER


def reconnectable(error: BaseException) -> bool:
    """Whether a fresh connection may succeed where this one failed: a connection the server
    dropped (a restart, a failover, an idle-connection kill), not a pool that ran dry."""
    return classify(error) is Fault.UNAVAILABLE and not isinstance(
        error, sa_exc.TimeoutError | PoolExhausted)


def storage_error(
    error: BaseException,
    doing: str,
    *,
    saga_id: UUID | None = None,
    saga_name: str | None = None,
    step_name: str | None = None,
) -> SagaError:
    """sagakit's error for a database error met while ``doing`` something (e.g. "writing a
    checkpoint"): sagakit's own errors as they are, anything else a :class:`SagaStorageError`
    of the right kind, with ``error`` as its cause (the caller raises it ``from error``)."""
    if isinstance(error, SagaError):
        return error
    fault = classify(error)
    what = f"saga {saga_id}: " if saga_id is not None else ""
    reason = _describe(error)
    if _missing_column(error):
        reason += f"; the tables lack a column this sagakit writes: {UPGRADE_HINT}"
    elif _missing_table(error):
        reason += f"; a table this sagakit uses is missing (create_schema() makes it): {UPGRADE_HINT}"
    if fault is Fault.UNAVAILABLE:
        kind: type[SagaStorageError] = SagaStorageUnavailableError
        message = f"{what}the database is unavailable while {doing} ({reason})"
    elif fault is Fault.REJECTED:
        kind = SagaStorageRejectedError
        message = f"{what}the database refused the data while {doing} ({reason})"
    else:
        kind = SagaStorageError
        message = f"{what}the database failed while {doing} ({reason})"
    return kind(message, saga_id=saga_id, saga_name=saga_name, step_name=step_name)


def _describe(error: BaseException) -> str:
    """One line: the innermost driver error's type and first line."""
    inner = error
    if isinstance(error, sa_exc.DBAPIError) and error.orig is not None:
        inner = error.orig
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
    return f"{type(inner).__name__}: {text[:300]}" if text else type(inner).__name__


def _missing_column(error: BaseException) -> bool:
    """Whether the database refused a statement naming a column the table lacks (tables made
    by an older sagakit): SQLSTATE 42703, MySQL/MariaDB 1054, SQLite "no such column"."""
    for current in _chain(error):
        if getattr(current, "sqlstate", None) == "42703" or _mysql_number(current) == 1054:
            return True
        if _is_sqlite(current) and ("no such column" in str(current)
                                    or "has no column named" in str(current)):
            return True
    return False


def _missing_table(error: BaseException) -> bool:
    """Whether the database refused a statement naming a table that does not exist (the
    queues table, before the migration adding it): SQLSTATE 42P01, MySQL/MariaDB 1146, SQLite
    "no such table"."""
    for current in _chain(error):
        if getattr(current, "sqlstate", None) == "42P01" or _mysql_number(current) == 1146:
            return True
        if _is_sqlite(current) and "no such table" in str(current):
            return True
    return False


def lock_conflict(error: sa_exc.DBAPIError) -> bool:
    """A deadlock or lock wait timeout (MySQL/MariaDB 1213/1205, PostgreSQL 40P01/55P03)."""
    orig = error.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code in ("40P01", "55P03"):
        return True
    args: Any = getattr(orig, "args", ())
    return bool(args) and args[0] in (1213, 1205)


def _mysql_number(error: BaseException) -> int | None:
    """The MySQL/MariaDB error number of a pymysql-style error (``args[0]``), or None."""
    if not _named(error, ("OperationalError", "InterfaceError", "InternalError", "DataError",
                          "IntegrityError", "ProgrammingError", "NotSupportedError", "Error",
                          "DatabaseError", "MySQLError")):
        return None
    args: Any = getattr(error, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return args[0]
    return None


def _named(error: BaseException, names: Any) -> bool:
    module = type(error).__module__
    return type(error).__name__ in names and not module.startswith(("sqlalchemy", "builtins"))


def _is_sqlite(error: BaseException) -> bool:
    return type(error).__module__ in ("sqlite3", "_sqlite3", "aiosqlite")
