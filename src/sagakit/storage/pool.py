"""Connections taken straight from an engine's pool for driver-level statements (the hot paths
of PostgreSQL and MySQL/MariaDB), without SQLAlchemy's ``Connection`` around them.

The SQLAlchemy pool still does the bookkeeping (checkout and checkin events, invalidation,
overflow, ``pool_pre_ping``), so these connections and the ones SQLAlchemy hands out are the
same pool and the same limits.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util.concurrency import greenlet_spawn

__all__ = ["LeasedStart", "PoolLease"]


@dataclasses.dataclass(slots=True)
class LeasedStart:
    """The insert that starts a saga RUNNING at version 1, leased to ``owner`` for
    ``lease_seconds``; ``text`` is the context's JSON."""

    saga_id: UUID
    name: str
    text: str
    fingerprint: str | None
    owner: str
    lease_seconds: float


class PoolLease:
    """``async with PoolLease(engine) as lease``: one pooled connection for the block.

    ``lease.driver`` is the driver's own connection (asyncpg's or asyncmy's). Statements sent on
    it bypass SQLAlchemy, so whoever sends them ends any transaction they open. After a driver
    error that leaves the connection unusable, call :meth:`invalidate`: the pool then discards
    it instead of handing it out again.
    """

    __slots__ = ("_fairy", "_pool", "driver")

    def __init__(self, engine: AsyncEngine) -> None:
        self._pool = engine.sync_engine.pool
        self._fairy: Any = None
        self.driver: Any = None

    async def __aenter__(self) -> PoolLease:
        self._fairy = await greenlet_spawn(self._pool.connect)
        self.driver = self._fairy.driver_connection
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.driver = None
        await greenlet_spawn(self._fairy.close)

    async def get_raw_connection(self) -> Any:
        """The pool's connection (what ``AsyncConnection.get_raw_connection`` returns)."""
        return self._fairy

    async def invalidate(self) -> None:
        """Close the connection and drop it from the pool (a dead or confused connection)."""
        await greenlet_spawn(self._fairy.invalidate)
