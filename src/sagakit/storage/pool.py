"""The SQL storage's database connections: a fair gate in front of the engine's pool, pooled
connections for driver-level statements, and what happens when connections die.

**The gate.** A storage uses at most as many connections at once as its engine's pool holds
(``pool_size + max_overflow``). Callers beyond that wait in line instead of failing, served in
order of urgency and, within each, first come first served: lease renewals and releases first
(a saga must not lose its lease because new sagas are queueing), then checkpoints, claims and
reads of running sagas, then the starts of new sagas. A caller that waits longer than the
storage's ``acquire_timeout`` (120 s by default) gets
:class:`~sagakit.storage.faults.PoolExhausted` (a
``SagaStorageUnavailableError`` at the storage's surface) with nothing written. Engines whose
pool has no limit (``NullPool``, ``max_overflow=-1``) get no gate.

**Dead connections.** After a database restart, a failover or an idle-connection kill, every
pooled connection is dead. :func:`forget_connections` marks all of them for replacement, the
way SQLAlchemy does when it notices a disconnect itself, so the next checkout opens a fresh one.

**Driver-level connections** (:class:`PoolLease`) are taken from the same pool, for the hot paths
of PostgreSQL and MySQL/MariaDB, without SQLAlchemy's ``Connection`` around them; the pool still
does the bookkeeping (checkout and checkin events, invalidation, overflow, ``pool_pre_ping``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util.concurrency import greenlet_spawn

from sagakit.exceptions import SagaError
from sagakit.storage.faults import PoolExhausted, reconnectable, storage_error

__all__ = [
    "LEASE", "START", "WORK", "ConnectionGate", "Connections", "LeasedStart", "PoolLease",
]

T = TypeVar("T")

LEASE = 0
"""Gate priority of lease renewals and releases."""
WORK = 1
"""Gate priority of checkpoints, claims and reads."""
START = 2
"""Gate priority of the starts of new sagas (they wait while running sagas make progress)."""


@dataclasses.dataclass(slots=True)
class LeasedStart:
    """The insert that starts a saga RUNNING at version 1, leased to ``owner`` for
    ``lease_seconds``; ``text`` is the context's JSON; ``deadline_seconds`` (None: no deadline)
    sets ``deadline_at`` that far from now."""

    saga_id: UUID
    name: str
    text: str
    fingerprint: str | None
    owner: str
    lease_seconds: float
    deadline_seconds: float | None = None


class ConnectionGate:
    """Admits at most ``capacity`` users of the pool at once; see the module docstring.

    ``enter``/``leave`` bracket one use of a connection. Entering costs nothing more than a
    counter while connections are free. A driver-level user leaving hands its connection
    itself to the next driver-level waiter (:class:`PoolLease`): checked back in, an overflow
    connection would be closed by the pool (its idle queue holds only ``pool_size``), and the
    waiter would open a new one."""

    __slots__ = ("_closing", "_order", "_waiters", "capacity", "in_use", "timeout")

    def __init__(self, capacity: int, timeout: float) -> None:
        self.capacity = capacity
        self.timeout = timeout
        self.in_use = 0
        self._waiters: list[tuple[int, int, bool, asyncio.Future[Any]]] = []
        self._order = itertools.count()
        self._closing: set[asyncio.Task[Any]] = set()

    @classmethod
    def for_engine(cls, engine: AsyncEngine, timeout: float) -> ConnectionGate | None:
        """The gate for an engine's pool (None when the pool sets no limit)."""
        pool: Any = engine.sync_engine.pool
        size = getattr(pool, "size", None)
        overflow = getattr(pool, "_max_overflow", None)
        if not callable(size) or not isinstance(overflow, int) or overflow < 0:
            return None
        capacity = size() + overflow
        if capacity < 1:
            return None
        return cls(capacity, timeout)

    def take(self) -> bool:
        """Take a free slot at once if there is one nobody waits for (no coroutine: the hot
        path's way in); False: :meth:`enter` and wait."""
        if self.in_use < self.capacity and not self._waiters:
            self.in_use += 1
            return True
        return False

    async def enter(self, priority: int, *, takes_connection: bool = False) -> Any:
        """Wait for a slot; raises PoolExhausted after ``timeout`` seconds. With
        ``takes_connection``, the slot may come with the checked-out connection of the user who
        left it (returned; None otherwise)."""
        if self.take():
            return None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), takes_connection, future))
        try:
            async with asyncio.timeout(self.timeout):
                return await future
        except BaseException as error:
            if future.done() and not future.cancelled():
                # The slot was handed over as this waiter gave up: pass it on.
                self._check_in_later(self.leave(future.result()))
            else:
                future.cancel()  # leave() skips it
            if isinstance(error, TimeoutError):
                raise PoolExhausted(
                    f"no database connection came free within {self.timeout:g} s "
                    f"({self.capacity} in use by this storage, {len(self._waiters)} callers "
                    "waiting); raise acquire_timeout or the pool size, or run fewer sagas at once"
                ) from None
            raise

    def leave(self, connection: Any = None) -> Any:
        """Give the slot to the most urgent waiter still waiting (and ``connection``, a checked
        out pool connection, if that waiter takes one), or free it. Returns the connection when
        nobody took it: the caller checks it in."""
        waiters = self._waiters
        while waiters:
            _, _, takes, future = heapq.heappop(waiters)
            if future.done():
                continue
            if takes and connection is not None:
                future.set_result(connection)
                return None
            future.set_result(None)
            return connection
        self.in_use -= 1
        return connection

    def _check_in_later(self, connection: Any) -> None:
        if connection is not None:
            task = asyncio.get_running_loop().create_task(greenlet_spawn(connection.close))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)


class PoolLease:
    """``async with PoolLease(engine, gate, priority) as lease``: one pooled connection for the
    block (through the gate, when there is one).

    ``lease.driver`` is the driver's own connection (asyncpg's or asyncmy's). Statements sent on
    it bypass SQLAlchemy, so whoever sends them ends any transaction they open. After a driver
    error that leaves the connection unusable, call :meth:`invalidate`: the pool then discards
    it instead of handing it out again.
    """

    __slots__ = ("_fairy", "_gate", "_pool", "_priority", "driver")

    def __init__(self, engine: AsyncEngine, gate: ConnectionGate | None = None,
                 priority: int = WORK) -> None:
        self._pool = engine.sync_engine.pool
        self._gate = gate
        self._priority = priority
        self._fairy: Any = None
        self.driver: Any = None

    async def __aenter__(self) -> PoolLease:
        gate = self._gate
        fairy = None
        if gate is not None:
            # ConnectionGate.take, inline: this runs for every checkpoint
            if gate.in_use < gate.capacity and not gate._waiters:
                gate.in_use += 1
            else:
                fairy = await gate.enter(self._priority, takes_connection=True)
        if fairy is None:
            try:
                fairy = await greenlet_spawn(self._pool.connect)
                assert fairy is not None
            except BaseException:
                if gate is not None:
                    gate.leave()
                raise
        self._fairy = fairy
        self.driver = fairy.driver_connection
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.driver = None
        fairy, self._fairy = self._fairy, None
        gate = self._gate
        if gate is not None:
            if not gate._waiters:
                gate.in_use -= 1  # ConnectionGate.leave with nobody waiting, inline
            elif fairy.is_valid:
                fairy = gate.leave(fairy)  # None: the next waiter took it, still checked out
            else:
                gate.leave()  # an invalidated connection goes back to the pool, discarded
        if fairy is not None:
            await greenlet_spawn(fairy.close)

    async def get_raw_connection(self) -> Any:
        """The pool's connection (what ``AsyncConnection.get_raw_connection`` returns)."""
        return self._fairy

    async def invalidate(self) -> None:
        """Close the connection and drop it from the pool (a dead or confused connection)."""
        await greenlet_spawn(self._fairy.invalidate)


class Connections:
    """How the SQL storage gets its connections: through the gate, in autocommit mode where
    that saves round trips, and once more on a fresh connection when a pooled one turns out
    dead."""

    def __init__(self, engine: AsyncEngine, dialect_name: str, acquire_timeout: float) -> None:
        self.engine = engine
        self.autocommit_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.gate = ConnectionGate.for_engine(engine, acquire_timeout)
        self._single_autocommits = dialect_name == "postgresql"
        self._reads_autocommit = dialect_name in ("postgresql", "sqlite")

    @contextlib.asynccontextmanager
    async def single(self, *, write: bool = False, priority: int = WORK
                     ) -> AsyncIterator[AsyncConnection]:
        """A connection for one statement that is its own transaction: autocommit where that
        saves round trips (PostgreSQL; SQLite reads), else a transaction committed on exit."""
        autocommit = self._single_autocommits or (self._reads_autocommit and not write)
        async with self._gated(priority):
            if autocommit:
                async with self.autocommit_engine.connect() as conn:
                    yield conn
            else:
                async with self.engine.begin() as conn:
                    yield conn

    @contextlib.asynccontextmanager
    async def transaction(self, *, priority: int = WORK) -> AsyncIterator[AsyncConnection]:
        """A connection inside a transaction, committed on success."""
        async with self._gated(priority), self.engine.begin() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _gated(self, priority: int) -> AsyncIterator[None]:
        gate = self.gate
        if gate is None:
            yield
            return
        await gate.enter(priority)
        try:
            yield
        finally:
            gate.leave()

    async def call(
        self, doing: str, operation: Callable[[AsyncConnection], Awaitable[T]], *,
        mode: str = "read", retry: bool = True, saga_id: UUID | None = None,
        priority: int = WORK,
    ) -> T:
        """Run ``operation`` on a connection: ``mode`` "read" or "write" (one statement, see
        :meth:`single`) or "transaction". With ``retry``, a connection found dead is replaced
        and the operation runs once more (only for operations that may run twice). Errors
        other than sagakit's own become SagaStorageError (see :func:`storage_error`) saying
        what was being done."""
        for attempt in (1, 2):
            try:
                if mode == "transaction":
                    async with self.transaction(priority=priority) as conn:
                        return await operation(conn)
                async with self.single(write=mode == "write", priority=priority) as conn:
                    return await operation(conn)
            except SagaError:
                raise
            except Exception as error:
                if retry and attempt == 1 and reconnectable(error):
                    self.forget()
                    continue
                raise storage_error(error, doing, saga_id=saga_id) from error
        raise AssertionError("unreachable")

    def forget(self) -> None:
        """Mark every connection the pool holds now as stale: each is replaced by a fresh one
        at its next checkout. This is what SQLAlchemy itself does when it notices a disconnect
        (its pool's ``_invalidate``); sagakit does it too when a driver-level statement finds
        its connection dead, since the pool's other connections died with it."""
        pool: Any = self.engine.sync_engine.pool
        invalidate = getattr(pool, "_invalidate", None)
        if invalidate is not None:
            invalidate(None, None, False)  # no connection: moves the pool's invalidation time
