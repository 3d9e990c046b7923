"""Counting what a storage sends to its database, from SQLAlchemy's engine events.

A server transaction is counted once per COMMIT or ROLLBACK sent, plus once per statement run
on an autocommit connection (each is its own transaction on the server). BEGINs the drivers send
implicitly are not statements of ours and are not counted.

On PostgreSQL the storage sends its hot-path statements straight through asyncpg, below
SQLAlchemy's events: those are counted by an asyncpg query logger attached to every connection at
checkout. They are single statements outside any transaction block (autocommit), so each is one
server transaction. The type introspection asyncpg runs by itself, once per connection, the
first time a statement uses a type it has not met yet (``typeinfo_tree`` and the ``jit``
setting around it), is not counted; nor are the BEGIN and COMMIT asyncpg sends for a
SQLAlchemy transaction (SQLAlchemy's events count that transaction).

On MySQL/MariaDB the storage's hot path also goes through the driver's own cursor, so there
every command is counted on the wire instead (the driver's ``_execute_command``) and
SQLAlchemy's events are not used. One COM_QUERY may carry several statements (the storage sends
a checkpoint's ``UPDATE``, ``INSERT`` and ``COMMIT`` as one query, separated by ``;`` and a
newline): each is counted, a ``COMMIT`` as a transaction, and the query as one round trip.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

_ASYNCPG_INTROSPECTION = ("typeinfo_tree", "set_config('jit'")
"""Markers of the queries asyncpg sends on its own to learn about types (see above)."""


@dataclasses.dataclass
class Counts:
    statements: int = 0
    transactions: int = 0
    reads: int = 0
    param_bytes: int = 0
    """Bytes of the values sent with statements (on MySQL/MariaDB, counted on the wire: the
    statement text, which carries them inline)."""
    round_trips: int = 0
    """Queries sent and answered (counted on the wire on MySQL/MariaDB only)."""

    def reset(self) -> None:
        self.statements = self.transactions = self.reads = self.param_bytes = 0
        self.round_trips = 0


def param_bytes(value: Any) -> int:
    """Rough size of a statement's parameters: strings and bytes by length, containers summed."""
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, dict):
        return sum(param_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(param_bytes(v) for v in value)
    return 0


class SqlCounter:
    """Attach to an engine; ``counts`` grows as the engine talks to the server."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.counts = Counts()
        self.log: list[str] = []
        self._engine = engine.sync_engine
        self._watched: list[Any] = []
        self._wire = engine.dialect.name in ("mysql", "mariadb")
        event.listen(self._engine, "before_cursor_execute", self._on_execute)
        event.listen(self._engine, "commit", self._on_end)
        event.listen(self._engine, "rollback", self._on_end)
        event.listen(self._engine.pool, "checkout", self._on_checkout)

    async def aclose(self) -> None:
        """Stop counting, after the driver's query logs still queued on the event loop (asyncpg
        delivers them with ``call_soon``) have been counted."""
        for _ in range(3):
            await asyncio.sleep(0)
        self.close()

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._on_execute)
        event.remove(self._engine, "commit", self._on_end)
        event.remove(self._engine, "rollback", self._on_end)
        event.remove(self._engine.pool, "checkout", self._on_checkout)
        for driver in self._watched:
            if self._wire:
                del driver._execute_command  # back to the class's method
            else:
                driver.remove_query_logger(self._on_driver_query)

    def _wrap_wire(self, driver: Any) -> None:
        if driver in self._watched:
            return
        original = driver._execute_command
        counts, log = self.counts, self.log

        async def counted(command: int, sql: Any, *args: Any, **kwargs: Any) -> Any:
            text = sql.decode(errors="replace") if isinstance(sql, bytes) else str(sql)
            counts.round_trips += 1
            for statement in text.split(";\n"):  # a multi-statement query, see above
                word = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
                if word in {"COMMIT", "ROLLBACK"}:
                    counts.transactions += 1
                elif word:
                    counts.statements += 1
                    counts.reads += word == "SELECT"
                    counts.param_bytes += len(statement)
                    log.append("wire: " + statement.strip().split("\n")[0][:80])
            return await original(command, sql, *args, **kwargs)

        driver._execute_command = counted
        self._watched.append(driver)

    def _on_checkout(self, dbapi_connection: Any, *args: Any) -> None:
        driver = getattr(dbapi_connection, "driver_connection", None)
        if self._wire:
            self._wrap_wire(driver)
        elif hasattr(driver, "add_query_logger") and driver not in self._watched:
            driver.add_query_logger(self._on_driver_query)
            self._watched.append(driver)

    def _on_driver_query(self, record: Any) -> None:
        if any(marker in record.query for marker in _ASYNCPG_INTROSPECTION):
            return
        text = record.query.lstrip().split(None, 1)[0].upper().rstrip(";")
        if text in {"BEGIN", "COMMIT", "ROLLBACK"}:
            return  # SQLAlchemy's own transaction, counted by its events
        self.counts.param_bytes += param_bytes(record.args)
        self.counts.statements += 1
        self.counts.transactions += 1
        if text == "SELECT":
            self.counts.reads += 1
        self.log.append("raw: " + record.query.strip().split("\n")[0][:80])

    def _on_execute(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self._wire:
            return
        text = statement.lstrip().split(None, 1)[0].upper()
        if text in {"BEGIN", "PRAGMA"}:
            return
        self.counts.statements += 1
        self.counts.param_bytes += param_bytes(args[0] if args else None)
        if text == "SELECT":
            self.counts.reads += 1
        self.log.append(statement.strip().split("\n")[0][:80])
        if conn.get_isolation_level() == "AUTOCOMMIT":
            self.counts.transactions += 1

    def _on_end(self, conn: Any) -> None:
        if self._wire:
            return
        if conn.get_isolation_level() != "AUTOCOMMIT" and conn.in_transaction():
            self.counts.transactions += 1
