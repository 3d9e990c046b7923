"""The SQL storage's liveness sessions (see :mod:`sagakit.storage.liveness`).

PostgreSQL and MySQL/MariaDB: one connection per session, opened outside the storage's pool
(an engine of its own without a pool, on the same URL), in autocommit (an idle session holds
no transaction open), holding the owner's lock for as long as it lives. The driver tells when that connection ends
(asyncpg's termination listener; the end of asyncmy's or aiomysql's asyncio transport), so
that a worker cut off from the database stops its runs before another worker, seeing the lock
free, takes them over: the next look would be up to ``every`` seconds late. SQLite: no connection;
the test of a lease's owner is the ``sagakit_owner_dead`` SQL function, registered on each of
the storage's connections (:func:`register_sqlite_function`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from sagakit.storage.liveness import owner_is_dead
from sagakit.storage.queries import Queries

__all__ = ["SqlSessions", "register_sqlite_function"]


class SqlSessions:
    """Liveness sessions of one SQL storage (PostgreSQL or MySQL/MariaDB)."""

    def __init__(self, engine: AsyncEngine, queries: Queries) -> None:
        self._url = engine.url
        self._queries = queries
        dialect = queries.d
        self._postgres = dialect.is_postgres
        self._engine: AsyncEngine | None = None
        self._watchers: dict[int, asyncio.Task[None]] = {}
        if dialect.is_postgres:
            self._lock = sa.text(
                f"SELECT pg_try_advisory_lock({dialect.lock_space}, hashtext(:owner))")
        else:
            self._lock = sa.text("SELECT GET_LOCK(CONCAT('sagakit:', MD5(:owner)), 0)")

    async def open(self, owner: str, on_lost: Callable[[], object]) -> AsyncConnection | None:
        if self._engine is None:
            self._engine = create_async_engine(self._url, poolclass=NullPool)
        conn = await self._engine.connect()
        try:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            got = (await conn.execute(self._lock, {"owner": owner})).scalar()
        except BaseException:
            await conn.close()
            raise
        if not got:
            await conn.close()
            return None
        driver: Any = (await conn.get_raw_connection()).driver_connection
        if hasattr(driver, "add_termination_listener"):  # asyncpg
            driver.add_termination_listener(lambda _conn: on_lost())
        elif (ended := _end_of(driver)) is not None:
            self._watchers[id(conn)] = asyncio.create_task(
                self._call_when(id(conn), ended, on_lost))
        return conn

    async def watch(self, session: Any, owner: str) -> int:
        return await self._queries.look(session, owner)

    async def close(self, session: Any) -> None:
        self._watchers.pop(id(session), None)  # its watcher ends with it, quietly
        try:
            await session.close()
        except Exception:
            await session.invalidate()

    async def _call_when(self, key: int, ended: Awaitable[object],
                         on_lost: Callable[[], object]) -> None:
        # Not cancelled on close: the driver's own close awaits the same waiter.
        with contextlib.suppress(Exception):
            await ended
        if self._watchers.pop(key, None) is not None:
            on_lost()

    async def dispose(self) -> None:
        """Dispose of the sessions' engine (the storage closing)."""
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None


def _end_of(driver: Any) -> Awaitable[object] | None:
    """What completes when a MySQL driver's connection ends (closed by either side, reset, or
    failed), or None for a driver sagakit does not know: then the next look finds it.

    asyncmy's protocol and aiomysql's stream writer both offer ``wait_closed()`` (asyncio
    streams' own contract); they are reached through the driver's private attributes, checked
    here so that a driver release that moves them only costs the early warning."""
    transport = getattr(driver, "_transport", None)  # asyncmy
    protocol = transport.get_protocol() if transport is not None else None
    if protocol is not None and callable(getattr(protocol, "wait_closed", None)):
        return protocol.wait_closed()  # type: ignore[no-any-return]
    writer = getattr(driver, "_writer", None)  # aiomysql: asyncio streams
    if isinstance(writer, asyncio.StreamWriter):
        return writer.wait_closed()
    return None


def register_sqlite_function(dbapi_connection: Any) -> None:
    """Make ``sagakit_owner_dead(owner)`` (1 or 0) known on one SQLite connection."""
    dbapi_connection.create_function(
        "sagakit_owner_dead", 1, lambda owner: int(owner_is_dead(owner)))
